"""Tests of rapo_nb.scaling: measurement functions at tiny sizes, the memory-law fit on synthetic data, the Table 2
builder (paper values only in 'paper' columns), communication counts, goal verdicts, and the peer side-by-side."""
import math
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from rapo_nb.config import load_config, PAPER_TABLE2, PAPER_MEMORY_LAW_GB, SPECIALISTS
from rapo_nb import scaling as sc


@pytest.fixture(scope="module")
def cfg():
    return load_config("quick", device="cpu")


# --- measurement functions on tiny sizes -------------------------------------------------------------------------

def test_timed_reports_median_and_cpu():
    calls = []
    r = sc.timed(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(r["times_s"]) == 4
    assert r["median_s"] == pytest.approx(float(np.median(r["times_s"])))
    with pytest.raises(ValueError, match="repeats"): sc.timed(lambda: None, repeats=0)


def test_tensor_bytes_counts_each_storage_once():
    x = torch.zeros(1000); y = torch.zeros(10, dtype=torch.float16)
    assert sc.tensor_bytes({"a": x, "b": [x, x[:5]], "c": SimpleNamespace(t=y)}) == 4000 + 20


def test_measure_size_in_process_grows_with_n():
    small = sc.measure_size(20, profile="quick", repeats=1)
    big = sc.measure_size(80, profile="quick", repeats=1)
    for r in (small, big):
        assert r["tick_ms"] > 0 and r["tensor_mb"] >= r["bank_mb"] > 0 and 0 <= r["consensus_share"] <= 1
        assert set(["state_ms", "consensus_ms", "routing_ms", "cpu_pct", "rss_delta_mb", "n_edges"]) <= set(r)
    assert big["bank_mb"] == pytest.approx(4 * small["bank_mb"], rel=0.01)  # the bank is linear in n
    assert big["n_edges"] > small["n_edges"]


def test_measure_size_subprocess_fresh_process_and_errors():
    r = sc.measure_size_subprocess(30, profile="quick", repeats=1)
    assert r["agents"] == 30 and r["rss_base_mb"] > 0
    assert r["bank_mb"] == pytest.approx(sc.measure_size(30, profile="quick", ticks=False)["bank_mb"])
    with pytest.raises(RuntimeError, match="n: expected"): sc.measure_size_subprocess(1, profile="quick")


def test_tick_batch_is_seeded_and_validated(cfg):
    a, b = sc.tick_batch(50, cfg, batch=16, seed=3), sc.tick_batch(50, cfg, batch=16, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a) and int(a["task"].max()) < cfg.state.n_tasks
    with pytest.raises(ValueError, match="batch"): sc.tick_batch(50, cfg, batch=0)
    with pytest.raises(ValueError, match="n: expected"): sc.build_deployment(1, cfg)


# --- memory law -------------------------------------------------------------------------------------------------

def test_fit_memory_law_recovers_synthetic_line():
    rng = np.random.default_rng(0)
    n = np.array([10, 50, 100, 500, 1000, 10_000, 100_000])
    m = 0.8 + 3.5e-5 * n + rng.normal(0, 1e-5, n.size)
    fit = sc.fit_memory_law(n, m)
    assert fit["a_gb"] == pytest.approx(0.8, abs=1e-4) and fit["b_gb_per_agent"] == pytest.approx(3.5e-5, rel=1e-3)
    assert fit["r2"] > 0.9999
    assert sc.memory_law(1000, fit) == pytest.approx(0.8 + 0.035, abs=1e-3)
    assert sc.memory_law(1000, PAPER_MEMORY_LAW_GB) == pytest.approx(2.3 + 74.0)


def test_fit_memory_law_rejects_bad_input():
    with pytest.raises(ValueError, match="agents"): sc.fit_memory_law([5, 5, 5], [1, 2, 3])
    with pytest.raises(ValueError, match="memory_gb"): sc.fit_memory_law([5, 6], [1.0])
    with pytest.raises(ValueError, match="memory_gb"): sc.fit_memory_law([5, 6], [1.0, float("nan")])


# --- Table 2 ----------------------------------------------------------------------------------------------------

def _sweep(counts):
    k = np.arange(1, len(counts) + 1, dtype=float)
    return pd.DataFrame(dict(agents=counts, rss_delta_mb=10 * k + 0.1, tensor_mb=k + 0.01, cpu_pct=5 * k + 0.2,
                             tick_ms=0.1 * k + 0.003, consensus_share=0.01 * k + 0.0004, rss_base_mb=300.0, threads=2,
                             peak_rss_mb=400.0))


def test_table2_puts_paper_rows_in_labelled_columns():
    sw = _sweep([10, 1000, 100_000])
    succ = pd.DataFrame(dict(agents=[10], success_simulated=[0.51], overhead_share=[0.02]))
    t = sc.build_table2(sw, succ).set_index("agents")
    assert list(t.index) == sorted(set(PAPER_TABLE2) | {100_000})
    for n, row in PAPER_TABLE2.items():  # every paper value sits in its 'paper:' column, unchanged
        assert t.loc[n, "paper: memory (GB)"] == row["memory_gb"] and t.loc[n, "paper: CPU (%)"] == row["cpu_pct"]
        assert t.loc[n, "paper: success"] == row["success"]
    assert t.loc[1000, "ours: RSS delta (MB)"] == 20.1 and t.loc[100_000, "ours: tick (ms)"] == pytest.approx(0.303)
    assert np.isnan(t.loc[100_000, "paper: memory (GB)"]) and np.isnan(t.loc[50, "ours: RSS delta (MB)"])
    assert t.loc[10, "ours: success (simulated)"] == 0.51
    ours = [c for c in t.columns if c.startswith("ours:")]
    paper_values = {v for row in PAPER_TABLE2.values() for v in row.values()}
    # no paper number leaks into our columns (our synthetic values are chosen disjoint from the paper's)
    assert not any(v in paper_values for c in ours for v in t[c].dropna())
    assert all(c.startswith(("paper:", "ours:")) for c in t.columns)


def test_table2_rejects_missing_columns():
    with pytest.raises(ValueError, match="rss_delta_mb"): sc.build_table2(_sweep([10]).drop(columns="rss_delta_mb"))


# --- communication ----------------------------------------------------------------------------------------------

def test_messages_match_built_graphs_and_hand_counts():
    from rapo_nb.consensus import make_topology
    for n in (3, 17, 64):
        assert make_topology("complete", n).n_edges == sc.messages_per_tick("complete", n)
    assert list(sc.pool_sizes(11, 3)) == [4, 4, 3]
    assert sc.messages_per_tick("two_level_pools", 11, n_pools=3) == 12 + 12 + 6 + 6
    assert sc.messages_per_tick("two_level_sqrt", 9) == 3 * 6 + 6
    assert sc.messages_per_tick("log_degree", 1024) == 1024 * 10
    assert sc.scheduler_reads("sparse", 500) == 500 and sc.scheduler_reads("two_level_pools", 9, n_pools=3) == 6
    with pytest.raises(ValueError, match="scheme"): sc.messages_per_tick("torus", 10)
    with pytest.raises(ValueError, match="n"): sc.messages_per_tick("complete", 0)


def test_communication_table_bytes(cfg):
    t = sc.communication_table([100], cfg)
    assert set(t.scheme) == set(sc.COMM_SCHEMES)
    row = t.set_index("scheme").loc["complete"]
    assert row.messages == 9900 and row.mb_per_tick == pytest.approx(9900 * 4 * cfg.state.prompt_dim / 1e6)


def test_dominance_point():
    df = pd.DataFrame(dict(agents=[10, 100, 1000], consensus_share=[0.2, 0.7, 0.8]))
    assert sc.dominance_point(df) == 100 and sc.dominance_point(df, 0.75) == 1000
    blip = pd.DataFrame(dict(agents=[10, 100, 1000], consensus_share=[0.9, 0.3, 0.6]))  # small-n blip, then dominance
    assert sc.dominance_point(blip) == 1000 and math.isnan(sc.dominance_point(blip, 0.95))
    with pytest.raises(ValueError, match="threshold"): sc.dominance_point(df, 1.5)


# --- goals and claims -------------------------------------------------------------------------------------------

def test_goal_verdicts_measured_and_projected():
    sw = _sweep([1000, 100_000]); sw["rss_delta_mb"] = [150.0, 9000.0]; sw["tick_ms"] = [1.0, 80.0]
    g = sc.goal_verdicts(sw, dict(a_gb=0.0, b_gb_per_agent=3e-5)).set_index("goal")
    assert not g.loc["1,000 agents: extra RSS", "met"] and g.loc["tick, 100,000 agents", "met"]
    assert g.loc["1,000,000 agents in one process", "how"].startswith("projected: RSS fit")
    assert g.loc["1,000,000 agents in one process", "ours"] == pytest.approx(30.0 + 0.3)
    assert not g.loc["1,000,000 agents in one process", "met"]
    sw2 = _sweep([1000, 1_000_000]); sw2["peak_rss_mb"] = [500.0, 20_000.0]
    g2 = sc.goal_verdicts(sw2, dict(a_gb=0.0, b_gb_per_agent=3e-5)).set_index("goal")
    assert g2.loc["1,000,000 agents in one process", "how"].startswith("measured") and g2.loc["1,000,000 agents in one process", "met"]
    assert g2.loc["tick, 100,000 agents", "met"] is None


def test_scaling_claims_verdicts_are_computed():
    sw = _sweep([10, 100, 500, 1000])
    dom = pd.DataFrame(dict(agents=[10, 100, 600], topology="complete", consensus_share=[0.1, 0.3, 0.8]))
    opt = pd.DataFrame(dict(variant=["baseline (fp32 M, full history, all agents)", "all three"], saving_accounted=[0.0, 0.38],
                            saving_rss=[0.0, 0.3]))
    succ = pd.DataFrame(dict(agents=[10, 100], success_simulated=[0.9, 0.8], overhead_share=[0.05, 0.2]))
    c = sc.scaling_claims(sw, sc.fit_memory_law(sw.agents, sw.rss_delta_mb / 1e3), dom, opt, succ).set_index("claim")
    # the §4.5 saving is set by our active_share: not comparable, the ±10-point comparison kept in the note
    assert c.loc["§4.5 optimisations save ≈ 40 % memory", "verdict"] == "not comparable"
    assert "of the paper's: True" in c.loc["§4.5 optimisations save ≈ 40 % memory", "note"]
    assert c.loc["coordination overhead < 10 % up to 500 agents", "verdict"] == "differs"
    assert c.loc["consensus dominates beyond 500 agents", "verdict"] == "reproduced"
    assert c.loc["success at 1,000 agents", "verdict"] == "not measured"
    opt.loc[1, "saving_accounted"] = 0.05
    c2 = sc.scaling_claims(sw, sc.fit_memory_law(sw.agents, sw.rss_delta_mb / 1e3), dom, opt, succ).set_index("claim")
    assert "of the paper's: False" in c2.loc["§4.5 optimisations save ≈ 40 % memory", "note"]
    assert c.loc["memory dominated by coordination metadata (60× agent state)", "verdict"] == "not measured"  # no bank_mb
    comm = sc.communication_table([10, 100, 1000, 10_000], load_config("quick"))
    c3 = sc.scaling_claims(sw.assign(bank_mb=0.1), sc.fit_memory_law(sw.agents, sw.rss_delta_mb / 1e3), dom, opt, succ, comm)
    c3 = c3.set_index("claim")
    assert c3.loc["communication O(n²) when all agents interact, O(n log n) typical", "verdict"] == "implemented as specified"
    assert c3.loc["memory dominated by coordination metadata (60× agent state)", "verdict"] == "differs"  # 400×: (40.1 − 0.1) MB / 0.1 MB
    assert set(c3.kind) == {"conformance", "result"}


# --- the peer side-by-side (fake conversations, so this file does not need the synthetic benchmark) ------------

def _fake_conversations(k=3, turns=7):
    convs = []
    for c in range(k):
        specs = [SPECIALISTS[(c + i // 2) % len(SPECIALISTS)] for i in range(turns)]
        ts = [SimpleNamespace(index=i, specialist=s, task=i % 10, modality=i % 5, text=f"turn {i}") for i, s in enumerate(specs)]
        convs.append(SimpleNamespace(turns=ts, handoff_turns=[i for i in range(1, turns) if specs[i] != specs[i - 1]]))
    return convs


def test_rapo_orchestration_counts_turns_and_handoffs(cfg):
    convs = _fake_conversations()
    r = sc.run_rapo_orchestration(convs, cfg, repeats=1)
    assert r["turns"] == 21 and r["handoffs"] == sc.count_handoffs(convs) == 9 and r["seconds"] > 0
    assert 0 < r["engine_share"] < 1                                   # the consensus step's share of the timed runs


def test_turn_overhead_verdict_is_computed_from_the_same_table():
    df = pd.DataFrame(dict(framework=["rapo_nb", "langgraph"], us_per_turn=[20.0, 220.0]))
    v = sc.turn_overhead_verdict(df)
    assert v.langgraph_over_rapo_nb.iloc[0] == 11.0 and v.target.iloc[0] == "met"
    assert sc.turn_overhead_verdict(df.assign(us_per_turn=[30.0, 220.0])).target.iloc[0] == "not met"
    assert sc.turn_overhead_verdict(df.iloc[:1]).target.iloc[0] == "not measured"
    assert sc.turn_overhead_verdict(df, target=12.0).target.iloc[0] == "not met"


def test_handoff_table_with_or_without_langgraph(cfg):
    df = sc.handoff_overhead_table(_fake_conversations(), cfg, repeats=1)
    assert df.framework.iloc[0] == "rapo_nb" and df.ratio_to_rapo_nb.iloc[0] == 1.0
    assert list(df.framework) == (["rapo_nb", "langgraph"] if sc.langgraph_available() else ["rapo_nb"])
    assert (df.us_per_handoff > 0).all()


@pytest.mark.skipif(not sc.langgraph_available(), reason="langgraph not installed (pip install rapo_nb[bench])")
def test_langgraph_drives_every_turn():
    r = sc.run_langgraph(_fake_conversations(k=2, turns=5), repeats=1)
    assert r["framework"] == "langgraph" and r["turns"] == 10 and r["seconds"] > 0


def test_handoff_table_without_langgraph_shows_rapo_alone(cfg, monkeypatch):
    monkeypatch.setattr(sc, "langgraph_available", lambda: False)
    df = sc.handoff_overhead_table(_fake_conversations(k=2), cfg, repeats=1)
    assert list(df.framework) == ["rapo_nb"]


def test_table_floatfmt_counts_whole():
    df = pd.DataFrame(dict(agents=[10.0], tick_ms=[1.23456]))
    assert sc.table_floatfmt(df) == (",.0f", ".4g")
    assert "1.235" in df.to_markdown(index=False, floatfmt=sc.table_floatfmt(df))


def test_scheduler_timing_tiny(cfg):
    df = sc.scheduler_timing([60], cfg, repeats=1, batch=32)
    assert len(df) == 2 and (df.ms_per_batch > 0).all() and (df.batch == 32).all()
    assert sc.scheduler_timing([20], cfg, repeats=1, batch=32).batch.iloc[0] == 20  # at most one request per agent
    flat, two = df.reads_per_decision
    assert two < flat == 60


def test_cpu_seconds_resolves_a_few_milliseconds():
    "A 3 ms busy loop must show up (clock-tick counters would often read 0 for it)."
    readings = []
    for _ in range(5):
        c0 = sc.cpu_seconds(); t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.003: pass
        readings.append(sc.cpu_seconds() - c0)
    assert all(0.001 < r < 0.05 for r in readings), readings
