"""Runtime: run_conversations contract, systems, ablations, checkpoints, metrics scrape, orchestrator crash + resume."""
import json, os, signal, subprocess, sys, time, urllib.request
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from rapo_nb.config import load_config
from rapo_nb.synthetic import generate_conversations
from rapo_nb.runtime import (run_conversations, Orchestrator, RuntimeMetrics, engine_state, load_engine_state,
                             CHECKPOINT_KIND)
from rapo_nb.systems import SYSTEMS, TURN_COLUMNS, CONV_COLUMNS, ERROR_TYPES
from rapo_nb.checkpoints import load_latest_checkpoint, checkpoint_paths, read_checkpoint, CheckpointError
from rapo_nb.store import MemoryStateStore
CFG = load_config("quick")

CONVS = generate_conversations(24, 3, CFG)

PY = [sys.executable, "-c", "import sys; from rapo_nb.runtime import orchestrator_main; sys.exit(orchestrator_main(sys.argv[1:]))"]

@pytest.fixture(scope="module")
def frames():
    return {s: run_conversations(CONVS, s, CFG, seed=1) for s in SYSTEMS}

def test_contract_columns_and_invariants(frames):
    for s, (turns, convs) in frames.items():
        assert tuple(turns.columns) == TURN_COLUMNS and tuple(convs.columns) == CONV_COLUMNS
        assert (turns.system == s).all() and (convs.system == s).all()
        assert list(convs.conv_id) == [c.id for c in CONVS]                       # every conversation once, input order
        assert len(turns) == sum(len(c.turns) for c in CONVS) and not turns.duplicated(["conv_id", "turn"]).any()
        assert convs.rule_success.dtype == bool and turns.handoff.dtype == bool and turns.clarification.dtype == bool
        assert (convs.failure_type.isna() == convs.rule_success).all()
        assert set(convs.failure_type.dropna()) <= set(ERROR_TYPES)
        rt = turns.groupby("conv_id")[["service_ms", "overhead_ms"]].sum().sum(axis=1)
        np.testing.assert_allclose(convs.set_index("conv_id").response_time_ms, rt.loc[convs.conv_id].values)
        h = turns[turns.handoff]
        assert (h.prev_agent >= 0).all() and (h.agent != h.prev_agent).all()
        assert (turns[~turns.handoff].prev_response == "").all()
        assert (turns.service_ms > 0).all() and (turns.overhead_ms >= 0).all() and turns.overhead_ms.sum() > 0
        assert (convs.n_handoffs == turns.groupby("conv_id").handoff.sum().loc[convs.conv_id].values).all()

def test_only_rapo_runs_consensus(frames):
    for s, (_, convs) in frames.items():
        rounds = convs.attrs["run"]["consensus_rounds"]
        assert (rounds > 0) == (s == "rapo"), (s, rounds)
    assert run_conversations(CONVS[:4], "rapo", CFG, ablation={"no_consensus": True})[1].attrs["run"]["consensus_rounds"] == 0

def test_sequential_hands_over_last_turn_only(frames):
    turns, _ = frames["sequential"]
    h = turns[turns.handoff & (turns.turn >= 3)]
    assert len(h)
    for _, row in h.iterrows():
        conv = next(c for c in CONVS if c.id == row.conv_id)
        earlier_user = conv.turns[row.turn - 2].text     # two turns back: not in a last-turn-only context
        assert earlier_user not in row.context_given

def test_consensus_engine_is_fed_outcomes_and_handoff_effectiveness():
    orch = Orchestrator(CFG, "rapo", 0)
    turns, convs = orch.run(CONVS)
    assert len(orch.engine.outcomes) == len(CONVS)
    assert orch.engine.effectiveness_rate() == pytest.approx(convs.rule_success.mean())
    assert float(orch.engine.effectiveness.min()) < 1.0        # some handoff edge saw a failed first answer

def test_deterministic_given_seed():
    a = run_conversations(CONVS[:8], "rapo", CFG, seed=5)
    b = run_conversations(CONVS[:8], "rapo", CFG, seed=5)
    cols = [c for c in TURN_COLUMNS if c != "overhead_ms"]
    pd.testing.assert_frame_equal(a[0][cols], b[0][cols])
    c = run_conversations(CONVS[:8], "rapo", CFG, seed=6)
    assert not a[0][cols].equals(c[0][cols])

def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="system"): run_conversations(CONVS[:2], "magic", CFG)
    with pytest.raises(ValueError, match="ablation"): run_conversations(CONVS[:2], "rapo", CFG, ablation={"no_brain": True})
    with pytest.raises(ValueError, match="ablation.no_consensus"): run_conversations(CONVS[:2], "rapo", CFG, ablation={"no_consensus": 1})
    with pytest.raises(ValueError, match="conversations"): run_conversations([], "rapo", CFG)
    with pytest.raises(ValueError, match="n_agents"): run_conversations(CONVS[:2], "rapo", CFG, n_agents=1)
    with pytest.raises(ValueError, match="seed"): run_conversations(CONVS[:2], "rapo", CFG, seed=-1)

def test_transition_model_reranks_candidates():
    class PreferHighId:
        def predict_reward(self, bank, agent_ids, task, modality): return agent_ids.float()
    orch = Orchestrator(CFG, "rapo", 0, n_agents=8, transition_model=PreferHighId())
    load = orch.load()
    task, mod = torch.tensor([0, 3]), torch.tensor([1, 2])
    from rapo_nb.routing import load_factor
    score = orch.bank.M.float()[:, task, mod].T * (1 - load_factor(load.active, load.pending, load.utilisation, CFG.routing))[None]
    expected = score.topk(3, dim=1).indices.max(1).values
    assert torch.equal(orch._rerank(task, mod, load, None), expected)
    turns, convs = run_conversations(CONVS[:4], "rapo", CFG, transition_model=PreferHighId())
    assert len(convs) == 4

def test_metrics_are_scraped_after_a_run():
    m = RuntimeMetrics(); port = m.serve(0)
    try:
        turns, _ = run_conversations(CONVS[:10], "rapo", CFG, metrics=m)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally: m.stop()
    def value(name):
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        return float(line.split()[1])
    assert value("rapo_handoffs_total") == turns.handoff.sum() > 0
    assert value("rapo_consensus_rounds_total") > 0
    assert value("rapo_response_time_ms_count") == len(turns)
    assert "rapo_rollbacks_total" in text and 'rapo_queue_length{queue="routing"}' in text

def test_store_receives_the_bank_every_tick():
    store = MemoryStateStore()
    orch = Orchestrator(CFG, "rapo", 0, store=store)
    orch.run(CONVS[:3])
    ver, arrays = store.get("bank")
    assert ver == orch.ticks > 0 and arrays["P"].shape == tuple(orch.bank.P.shape)
    np.testing.assert_array_equal(arrays["P"], orch.bank.P.numpy())

def test_orchestrator_checkpoint_resume_in_process(tmp_path):
    cfg = load_config("quick", overrides={"runtime.checkpoint_every": 20})
    orch = Orchestrator(cfg, "rapo", 0, checkpoint_dir=tmp_path)
    orch.run(CONVS)
    assert 1 <= len(checkpoint_paths(tmp_path)) <= cfg.runtime.checkpoints_kept
    it, payload = load_latest_checkpoint(tmp_path)
    fresh = Orchestrator(cfg, "rapo", 0, checkpoint_dir=tmp_path)
    assert fresh.resume() == it and fresh.done_ids == set(payload["done_ids"])
    with pytest.raises(ValueError, match="checkpoint: system"):
        Orchestrator(cfg, "sequential", 0, checkpoint_dir=tmp_path).resume()

@pytest.mark.slow
def test_kill_9_orchestrator_and_resume(tmp_path):
    "kill -9 mid-run; the restarted process resumes from the last checkpoint; every conversation exactly once."
    n = 40
    args = ["--out", str(tmp_path), "--n-conversations", str(n), "--checkpoint-every", "10", "--pace-s", "0.02", "--seed", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(PY + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ck = tmp_path / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and len(checkpoint_paths(ck)) < 2 and p.poll() is None: time.sleep(0.05)
    assert p.poll() is None, "orchestrator finished before it could be killed: " + p.stderr.read()[-2000:]
    os.kill(p.pid, signal.SIGKILL); p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL and not (tmp_path / "conversations.csv").exists()
    it, payload = load_latest_checkpoint(ck)
    done_before = set(payload["done_ids"])
    assert 0 < len(done_before) < n
    r = subprocess.run(PY + args[:-4] + ["--pace-s", "0", "--seed", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed_from={it} done={len(done_before)}" in r.stdout
    convs = pd.read_csv(tmp_path / "conversations.csv"); turns = pd.read_csv(tmp_path / "turns.csv")
    ids = [c.id for c in generate_conversations(n, 2, load_config("quick", seed=2))]
    assert sorted(convs.conv_id) == sorted(ids) and not convs.conv_id.duplicated().any()     # none lost, none twice
    assert not turns.duplicated(["conv_id", "turn"]).any()
    before = pd.DataFrame(payload["conv_records"]).set_index("conv_id")
    after = convs.set_index("conv_id").loc[before.index]
    assert (after.rule_success.values == before.rule_success.values).all()                  # checkpointed results kept as they were
    failures = [json.loads(l) for l in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["conv_id"] for f in failures) == sorted(convs.conv_id[~convs.rule_success])    # §4.4 failure log
    assert all(f["trajectory"] and {"agent", "capability", "capability_score"} <= set(f["trajectory"][0]) for f in failures)

def test_live_asyncio_orchestrator_runs_the_same_tick_order():
    import asyncio
    from rapo_nb.agents import SimulatedAgentPool
    from rapo_nb.runtime import LiveOrchestrator
    pool = SimulatedAgentPool(CFG.evaluation.n_agents, CFG, 0)
    live = LiveOrchestrator(CFG, "rapo", 0)
    turns, convs = asyncio.run(live.arun(CONVS[:4], [pool.agent(i) for i in range(pool.n)]))
    assert tuple(turns.columns) == TURN_COLUMNS and len(convs) == 4 and live.ticks >= 1 and live.consensus_rounds == live.ticks
    with pytest.raises(ValueError, match="agents"): asyncio.run(LiveOrchestrator(CFG, "rapo", 0).arun(CONVS[:1], [object()]))

def test_injected_crashes_are_replaced():
    orch = Orchestrator(CFG, "rapo", 0, failure_rate=0.1)
    turns, convs = orch.run(CONVS)
    assert orch.replacements > 0
    assert (convs.failure_type == "resource").any()

def test_benchmark_function_at_tiny_size():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_runtime", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_runtime.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    row = bench.bench_orchestrator(CONVS[:6], "sequential", CFG)
    assert row["turns"] == sum(len(c.turns) for c in CONVS[:6]) and row["turns_per_s"] > 0 and row["coordination_us_per_turn"] > 0

def test_orchestrator_reads_simulated_world_from_config():
    "Arrival rate, restart time and the agent-selection threshold come from cfg.simulation; rerank_k from cfg.runtime."
    o = Orchestrator(CFG, "rapo", 0)
    assert o.arrivals_per_agent_s == CFG.simulation.arrivals_per_agent_s
    fast = load_config("quick", simulation__arrivals_per_agent_s=4.0)
    assert Orchestrator(fast, "rapo", 0).arrivals_per_agent_s == 4.0
    assert Orchestrator(fast, "rapo", 0, arrivals_per_agent_s=1.0).arrivals_per_agent_s == 1.0
    _, slow_c = run_conversations(CONVS[:8], "sequential", CFG, seed=0)
    _, fast_c = run_conversations(CONVS[:8], "sequential", fast, seed=0)
    assert fast_c.attrs["run"]["sim_time_s"] < slow_c.attrs["run"]["sim_time_s"]
    # low_skill only relabels failures (routing is the same): 0 → no agent-selection failures; 1 → every skill is "low"
    types = {ls: run_conversations(CONVS, "sequential", load_config("quick", simulation__low_skill=ls), seed=0)[1].failure_type
             for ls in (0.0, 1.0)}
    assert (types[0.0] == "agent_selection").sum() == 0 and (types[1.0] == "agent_selection").sum() > 0
    assert set(types[1.0].dropna()) <= {"resource", "context_loss", "agent_selection"}
    assert (types[0.0].isna() == types[1.0].isna()).all()

def test_lazy_agents_change_memory_not_behaviour():
    "A lazy StateBank (§4.5) in the orchestrator gives the same turns as a dense one, and holds fewer C rows."
    runs = {}
    for lazy in (False, True):
        cfg = load_config("quick", state__lazy_agents=lazy)
        orch = Orchestrator(cfg, "rapo", 3, update_context=True)
        orch.run(CONVS[:8])
        runs[lazy] = (pd.DataFrame(orch.turn_records), orch.bank)
    (dense_turns, dense_bank), (lazy_turns, lazy_bank) = runs[False], runs[True]
    cols = ["conv_id", "turn", "agent", "handoff", "response", "outcome", "context_given"]
    pd.testing.assert_frame_equal(dense_turns[cols], lazy_turns[cols])
    torch.testing.assert_close(lazy_bank.context(), dense_bank.context())
    assert lazy_bank.lazy and lazy_bank.C.shape[0] == lazy_bank.n_materialised < dense_bank.C.shape[0]


# ---- LiveOrchestrator: the wall-clock run feeds the same consumers as the simulated one -----------------------------

def _live_agents(pool): return [pool.agent(i) for i in range(pool.n)]

@pytest.fixture(scope="module")
def live_flaky():
    "A live (asyncio) RAPO run of a dozen conversations against simulated agents that answer with errors/timeouts (no real sleeps)."
    import asyncio
    from rapo_nb.agents import SimulatedAgentPool
    from rapo_nb.runtime import LiveOrchestrator
    pool = SimulatedAgentPool(CFG.evaluation.n_agents, CFG, 0, failure_rate=0.2, failure_mix=(0.5, 0.5, 0.0))
    metrics = RuntimeMetrics()
    live = LiveOrchestrator(CFG, "rapo", 0, metrics=metrics)
    fed_outcomes, fed_exchanges = [], []              # what the consensus engine was handed, call by call
    record_outcomes, record_exchanges = live.engine.record_outcomes, live.engine.record_exchanges
    def spy_outcomes(s): fed_outcomes.extend(np.asarray(s, dtype=float).tolist()); return record_outcomes(s)
    def spy_exchanges(src, dst, ok): fed_exchanges.extend(zip(src.tolist(), dst.tolist(), ok.tolist())); return record_exchanges(src, dst, ok)
    live.engine.record_outcomes, live.engine.record_exchanges = spy_outcomes, spy_exchanges
    turns, convs = asyncio.run(live.arun(CONVS[:12], _live_agents(pool)))
    assert len(convs) == 12 and len(turns) == sum(len(c.turns) for c in CONVS[:12])
    failed = convs[~convs.rule_success]
    assert 0 < len(failed) < len(convs), "the run needs both failed and successful conversations to test anything"
    return dict(live=live, metrics=metrics, turns=turns, convs=convs, failed=failed,
                fed_outcomes=fed_outcomes, fed_exchanges=fed_exchanges)

def test_live_run_feeds_the_effectiveness_window(live_flaky):
    "(a) every finished conversation's rule outcome reaches the engine's E(c) window (§3.3)."
    live, convs = live_flaky["live"], live_flaky["convs"]
    want = sorted(convs.rule_success.astype(float))
    assert sorted(live_flaky["fed_outcomes"]) == want
    assert sorted(live.engine.outcomes) == want
    assert live.engine.effectiveness_rate() == pytest.approx(convs.rule_success.mean())

def test_live_run_feeds_handoff_effectiveness(live_flaky):
    "(b) every handoff reaches record_exchanges as (outgoing agent, receiving agent, first answer succeeded) — E_ij of eq. 5."
    turns = live_flaky["turns"]
    h = turns[turns.handoff]
    want = sorted(zip(h.prev_agent.astype(int), h.agent.astype(int), ((h.outcome == "ok") & ~h.clarification).astype(float)))
    assert want and {0.0, 1.0} <= {w[2] for w in want}          # handoffs that succeeded and ones that did not
    assert sorted(live_flaky["fed_exchanges"]) == want

def test_live_run_logs_failed_conversations(live_flaky, tmp_path):
    "(c) every failed conversation of the table is in failure_log (with its type and trajectory) and in the written log."
    from rapo_nb.runtime import write_failure_log
    live, failed = live_flaky["live"], live_flaky["failed"]
    log = {r["conv_id"]: r for r in live.failure_log}
    assert len(live.failure_log) == len(failed) and sorted(log) == sorted(failed.conv_id)
    assert all(log[c]["failure_type"] == t for c, t in zip(failed.conv_id, failed.failure_type))
    assert all(r["trajectory"] and {"agent", "capability", "outcome"} <= set(r["trajectory"][0]) for r in live.failure_log)
    path = write_failure_log(live.failure_log, tmp_path / "failures.jsonl")
    written = [json.loads(l) for l in path.read_text().splitlines()]
    assert sorted(r["conv_id"] for r in written) == sorted(failed.conv_id)

def test_live_run_updates_turn_metrics(live_flaky):
    "(d) the Prometheus turn counter (by outcome) and response-time histogram see every live turn."
    from rapo_nb.workers import OUTCOMES
    live, turns = live_flaky["live"], live_flaky["turns"]
    sample = live_flaky["metrics"].registry.get_sample_value
    by_outcome = turns.outcome.value_counts()
    assert len(by_outcome) > 1                                  # errors/timeouts were injected
    for o in OUTCOMES: assert (sample("rapo_turns_total", {"outcome": o}) or 0.0) == by_outcome.get(o, 0), o
    assert sample("rapo_response_time_ms_count") == len(turns)
    assert sample("rapo_response_time_ms_sum") == pytest.approx(turns.service_ms.sum())
    assert sample("rapo_handoffs_total") == turns.handoff.sum()
    assert sample("rapo_consensus_rounds_total") == live.ticks == live.consensus_rounds

def test_live_crashed_agents_restart_after_the_delay():
    "(e) a crashed agent is replaced, stays down for the next tick, and is back once agent_restart_s of wall time has passed."
    import asyncio
    from rapo_nb.agents import SimulatedAgentPool
    from rapo_nb.runtime import LiveOrchestrator
    cfg = load_config("quick", simulation__agent_restart_s=0.3)      # 3 ticks of 100 ms
    assert cfg.simulation.agent_restart_s > cfg.runtime.tick_ms / 1000
    pool = SimulatedAgentPool(cfg.evaluation.n_agents, cfg, 0, failure_rate=0.3, failure_mix=(0.0, 0.0, 1.0))
    live = LiveOrchestrator(cfg, "rapo", 0)
    crashed, seen_down = [], set()
    restart, tick = live._restart, live._tick
    def spy_restart(agent): crashed.append(agent); return restart(agent)
    def spy_tick(): seen_down.update(np.flatnonzero(~live.alive).tolist()); tick()
    live._restart, live._tick = spy_restart, spy_tick
    async def run_then_wait():
        out = await live.arun(CONVS[:8], _live_agents(pool))
        await asyncio.sleep(2 * cfg.simulation.agent_restart_s)      # asyncio wakes the earlier restart timers first
        return out
    turns, convs = asyncio.run(run_then_wait())
    assert len(convs) == 8 and crashed and live.replacements > 0
    assert seen_down == set(crashed)       # down until at least the next tick (≤ tick_ms after the crash < agent_restart_s)
    assert live.alive.all()                # every crashed agent is back

def test_live_run_is_refused_with_a_pointer_to_arun():
    from rapo_nb.runtime import LiveOrchestrator
    with pytest.raises(TypeError, match="arun"): LiveOrchestrator(CFG, "rapo", 0).run(CONVS[:1])


def test_checkpoint_holds_the_engine_state_not_the_object(tmp_path):
    "The orchestrator's checkpoint is tensors + JSON; the engine state it restores continues the run exactly."
    cfg = load_config("quick", overrides={"runtime.checkpoint_every": 5})
    orch = Orchestrator(cfg, "rapo", 0, checkpoint_dir=tmp_path)
    orch.run(CONVS[:8])
    orch.checkpoint()                                               # the state at the end of the run
    it, state = load_latest_checkpoint(tmp_path, CHECKPOINT_KIND)
    assert it == orch.ticks
    assert isinstance(state["engine"], dict) and torch.is_tensor(state["engine"]["effectiveness"])
    assert (tmp_path / f"ckpt-{it:012d}.rapo").read_bytes().startswith(b"RAPO-CHECKPOINT v2\n")
    a, b = Orchestrator(cfg, "rapo", 0), Orchestrator(cfg, "rapo", 0)
    load_engine_state(a.engine, engine_state(orch.engine))
    load_engine_state(b.engine, state["engine"])
    sa, sb = engine_state(a.engine), engine_state(b.engine)
    assert sa["counters"] == sb["counters"] and sa["outcomes"] == sb["outcomes"] and sa["prev_update"] == sb["prev_update"]
    a.bank.restore(orch.bank.snapshot()); b.bank.restore(orch.bank.snapshot())
    for _ in range(3):
        a.engine.step(a.bank); b.engine.step(b.bank)
    torch.testing.assert_close(a.bank.P, b.bank.P, rtol=0, atol=0)
    with pytest.raises(ValueError, match="engine.effectiveness"):
        load_engine_state(Orchestrator(cfg, "rapo", 0, n_agents=cfg.evaluation.n_agents + 3).engine, state["engine"])
