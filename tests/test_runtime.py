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
    cfg = load_config("quick", overrides={"runtime.checkpoint_every": 20, "runtime.segment_conversations": 6})
    orch = Orchestrator(cfg, "rapo", 0, checkpoint_dir=tmp_path)
    orch.run(CONVS)
    assert 1 <= len(checkpoint_paths(tmp_path)) <= cfg.runtime.checkpoints_kept
    it, payload = load_latest_checkpoint(tmp_path)
    fresh = Orchestrator(cfg, "rapo", 0, checkpoint_dir=tmp_path)
    assert fresh.resume() == it and fresh.done_ids == set(payload["done_ids"])
    with pytest.raises(ValueError, match="system is 'rapo', this run has 'sequential'"):
        Orchestrator(cfg, "sequential", 0, checkpoint_dir=tmp_path).resume()

@pytest.mark.slow
def test_kill_9_orchestrator_and_resume(tmp_path):
    """kill -9 mid-run; the restarted process resumes from the last checkpoint: every conversation exactly once, each
    with the outcome of an uninterrupted run with the same seed (issue 22: 4 of 40 rule_success values differed)."""
    n = 40
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    common = ["--n-conversations", str(n), "--segment-conversations", "8", "--checkpoint-every", "1", "--seed", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(PY + ["--out", str(killed), *common, "--pace-s", "0.02"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True)
    ck = killed / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and len(checkpoint_paths(ck)) < 2 and p.poll() is None: time.sleep(0.05)
    assert p.poll() is None, "orchestrator finished before it could be killed: " + p.stderr.read()[-2000:]
    os.kill(p.pid, signal.SIGKILL); p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL and not (killed / "conversations.csv").exists()
    it, payload = load_latest_checkpoint(ck)
    done_before = set(payload["done_ids"])
    assert 0 < len(done_before) < n
    r = subprocess.run(PY + ["--out", str(killed), *common], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed_from={it} done={len(done_before)}" in r.stdout
    from rapo_nb.runtime import orchestrator_main
    assert orchestrator_main(["--out", str(whole), *common]) == 0                           # uninterrupted, in this process
    convs = pd.read_csv(killed / "conversations.csv"); turns = pd.read_csv(killed / "turns.csv")
    ids = [c.id for c in generate_conversations(n, 2, load_config("quick", seed=2))]
    assert list(convs.conv_id) == ids and not convs.conv_id.duplicated().any()                # none lost, none twice
    assert not turns.duplicated(["conv_id", "turn"]).any()
    before = pd.DataFrame(payload["conv_records"]).set_index("conv_id")
    after = convs.set_index("conv_id").loc[before.index]
    assert (after.rule_success.values == before.rule_success.values).all()                  # checkpointed results kept as they were
    w_convs, w_turns = pd.read_csv(whole / "conversations.csv"), pd.read_csv(whole / "turns.csv")
    pd.testing.assert_frame_equal(convs[OUTCOME_CONV], w_convs[OUTCOME_CONV])              # the same run, every row
    pd.testing.assert_frame_equal(turns[OUTCOME_TURN], w_turns[OUTCOME_TURN])
    failures = [json.loads(l) for l in (killed / "failures.jsonl").read_text().splitlines()]
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


# ---- issue 22: resume is the same run; faults survived -----------------------------------------------------------

OUTCOME_TURN = [c for c in TURN_COLUMNS if c != "overhead_ms"]          # overhead_ms is measured wall time
OUTCOME_CONV = [c for c in CONV_COLUMNS if c != "response_time_ms"]    # (response_time_ms adds overhead_ms)
SEG = dict(overrides={"runtime.segment_conversations": 8, "runtime.checkpoint_every": 1})


class _Stop(Exception):
    "Stands for the process dying: raised from inside the control loop."


class _StopsAt(Orchestrator):
    "An orchestrator whose control loop dies at tick `stop_at` (its checkpoints stay on disk)."
    stop_at = 10**9
    def _tick(self):
        if self.ticks >= self.stop_at: raise _Stop()
        super()._tick()


def _same_outcomes(a, b):
    pd.testing.assert_frame_equal(a[0][OUTCOME_TURN], b[0][OUTCOME_TURN])
    pd.testing.assert_frame_equal(a[1][OUTCOME_CONV], b[1][OUTCOME_CONV])


@pytest.mark.parametrize("system", ["rapo", "ampo_rr"])
def test_resumed_run_gives_the_same_outcomes_as_an_uninterrupted_one(tmp_path, system):
    "Stopped mid-run and resumed: every turn and conversation as in one uninterrupted run with the same seed."
    cfg = load_config("quick", **SEG)
    convs = generate_conversations(40, 2, cfg)
    whole = Orchestrator(cfg, system, 2, failure_rate=0.05).run(convs)
    stopped = _StopsAt(cfg, system, 2, failure_rate=0.05, checkpoint_dir=tmp_path)
    stopped.stop_at = whole[1].attrs["run"]["ticks"] // 2
    with pytest.raises(_Stop): stopped.run(convs)
    again = Orchestrator(cfg, system, 2, failure_rate=0.05, checkpoint_dir=tmp_path)
    assert again.resume() > 0 and 0 < len(again.done_ids) < len(convs)
    resumed = again.run(convs)
    _same_outcomes(resumed, whole)
    assert resumed[1].attrs["run"]["ticks"] == whole[1].attrs["run"]["ticks"]
    assert resumed[1].attrs["run"]["sim_time_s"] == whole[1].attrs["run"]["sim_time_s"]


def test_checkpointing_does_not_change_the_run(tmp_path):
    "Segments are part of the run, not of checkpointing: with or without a folder, the same outcomes."
    cfg = load_config("quick", **SEG)
    convs = generate_conversations(24, 4, cfg)
    _same_outcomes(Orchestrator(cfg, "rapo", 4).run(convs), Orchestrator(cfg, "rapo", 4, checkpoint_dir=tmp_path).run(convs))
    assert len(checkpoint_paths(tmp_path)) >= 1


def test_turn_random_stream_depends_only_on_seed_conversation_turn_and_attempt():
    "The simulated agent draws from turn_rng(seed, conversation id, turn, 2·attempt + 1): nothing else moves it."
    from rapo_nb.runtime import turn_rng
    seen = []
    class Recording(type(Orchestrator(CFG, "rapo", 0).pool)):
        def respond(self, agent, history, context, turn, rng):
            seen.append((turn.text, rng.bit_generator.state["state"]["state"]))
            return super().respond(agent, history, context, turn, rng)
    cfg = load_config("quick")
    convs = CONVS[:6]
    for n_other in (0, 5):                                # other conversations running alongside change nothing
        seen.clear()
        orch = Orchestrator(cfg, "rapo", 9, pool=Recording(cfg.evaluation.n_agents, cfg, 9))
        orch.run(convs[:1] + generate_conversations(n_other, 77, cfg) if n_other else convs[:1])
        mine = [s for t, s in seen if any(t == u.text for u in convs[0].turns)]
        want = [turn_rng(9, convs[0].id, k, 1).bit_generator.state["state"]["state"] for k in range(len(convs[0].turns))]
        assert mine[:len(want)] == want[:len(mine)] and len(mine) >= len(want)
    a, b = turn_rng(1, "c1", 0, 1).random(4), turn_rng(1, "c1", 0, 1).random(4)
    assert (a == b).all() and not (a == turn_rng(1, "c2", 0, 1).random(4)).all()
    assert not (a == turn_rng(1, "c1", 1, 1).random(4)).all() and not (a == turn_rng(2, "c1", 0, 1).random(4)).all()


def test_resume_into_another_runs_folder_is_refused_naming_the_difference(tmp_path):
    cfg = load_config("quick", **SEG)
    convs = generate_conversations(16, 2, cfg)
    Orchestrator(cfg, "rapo", 2, checkpoint_dir=tmp_path).run(convs)
    o = Orchestrator(cfg, "rapo", 2, checkpoint_dir=tmp_path); o.resume()
    with pytest.raises(ValueError, match="n_conversations is 16, this run has 10"): o.run(convs[:10])
    o = Orchestrator(cfg, "rapo", 2, checkpoint_dir=tmp_path); o.resume()
    with pytest.raises(ValueError, match="conversations"): o.run(generate_conversations(16, 3, cfg))
    with pytest.raises(ValueError, match="seed is 2, this run has 3"):
        Orchestrator(cfg, "rapo", 3, checkpoint_dir=tmp_path).resume()
    with pytest.raises(ValueError, match="system is 'rapo', this run has 'sequential'"):
        Orchestrator(cfg, "sequential", 2, checkpoint_dir=tmp_path).resume()
    other = load_config("quick", overrides={**SEG["overrides"], "routing.c_max": 7})
    with pytest.raises(ValueError, match=f"config routing.c_max is {cfg.routing.c_max!r}, this run has 7.0"):
        Orchestrator(other, "rapo", 2, checkpoint_dir=tmp_path).resume()
    with pytest.raises(ValueError, match="failure_rate"):
        Orchestrator(cfg, "rapo", 2, failure_rate=0.1, checkpoint_dir=tmp_path).resume()
    kept = load_config("quick", overrides={**SEG["overrides"], "runtime.checkpoints_kept": 9, "runtime.store_retries": 1})
    assert Orchestrator(kept, "rapo", 2, checkpoint_dir=tmp_path).resume() > 0   # bookkeeping fields may change


def test_orchestrator_main_refuses_another_runs_folder_and_a_damaged_one(tmp_path, capsys):
    "Exit code 2 with the difference named; a folder of damaged checkpoints is 'cannot resume', not a fresh start."
    from rapo_nb.runtime import orchestrator_main
    base = ["--out", str(tmp_path), "--seed", "2", "--segment-conversations", "8", "--checkpoint-every", "1"]
    assert orchestrator_main(base + ["--n-conversations", "16"]) == 0
    capsys.readouterr()
    assert orchestrator_main(base + ["--n-conversations", "10"]) == 2
    assert "n_conversations is 16, this run has 10" in capsys.readouterr().err
    for p in checkpoint_paths(tmp_path / "checkpoints"): p.write_bytes(p.read_bytes()[:-7])
    assert orchestrator_main(base + ["--n-conversations", "16"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume: none of the" in err and "Traceback" not in err


def test_run_conversations_keeps_progress_in_a_default_folder(tmp_path, monkeypatch):
    "A run that dies leaves its checkpoint under results/checkpoints; the rerun resumes from it; success removes it."
    import rapo_nb.runtime as R
    from rapo_nb.config import results_dir
    cfg = load_config("quick", **SEG)
    convs = generate_conversations(32, 5, cfg)
    whole = run_conversations(convs, "rapo", cfg, seed=5, checkpoint_dir=False)
    root = results_dir(cfg.profile) / "checkpoints"
    assert not root.exists() or not any(root.iterdir())
    monkeypatch.setattr(R, "Orchestrator", type("Dies", (_StopsAt,), {"stop_at": whole[1].attrs["run"]["ticks"] // 2}))
    with pytest.raises(_Stop): run_conversations(convs, "rapo", cfg, seed=5)
    (folder,) = list(root.iterdir())
    it, payload = load_latest_checkpoint(folder)
    assert 0 < len(payload["done_ids"]) < len(convs)
    monkeypatch.setattr(R, "Orchestrator", Orchestrator)
    _same_outcomes(run_conversations(convs, "rapo", cfg, seed=5), whole)
    assert not folder.exists()


def _port(url): return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.redis
def test_redis_killed_and_restarted_mid_run_is_survived(tmp_path):
    "redis-server is killed mid-run and restarted 0.5 s later: store writes are retried, the run completes unchanged."
    import threading, redis
    from conftest import start_redis
    from rapo_nb.store import RedisStateStore
    proc, url = start_redis(tmp_path)
    cfg = load_config("quick", overrides={"runtime.store": "redis", "runtime.redis_url": url})
    convs = generate_conversations(16, 3, cfg)
    store = RedisStateStore(url, timeout_s=0.5)
    orch = Orchestrator(cfg, "rapo", 3, store=store)
    box = {}
    def blip():
        watcher = redis.Redis.from_url(url)
        while int(watcher.hget("rapo:v1:state:bank", "__version__") or 0) < 10: time.sleep(0.01)
        box["killed_at_tick"] = orch.ticks
        proc.kill(); proc.wait(timeout=10)
        time.sleep(0.5)
        box["proc"] = start_redis(tmp_path, port=_port(url))[0]
    t = threading.Thread(target=blip, daemon=True); t.start()
    try:
        turns, conv_df = orch.run(convs, pace_s=0.01)
        t.join(timeout=30)
        assert "proc" in box and box["killed_at_tick"] < orch.ticks            # the blip fell inside the run
        ver, arrays = store.get("bank")                                          # the restarted server has the last state
        assert ver >= 1 and np.array_equal(arrays["P"], orch.bank.P.numpy())
    finally:
        box.get("proc", proc).kill()
    _same_outcomes((turns, conv_df), Orchestrator(load_config("quick"), "rapo", 3).run(convs))


@pytest.mark.redis
@pytest.mark.slow
def test_redis_that_stays_down_stops_the_run_with_a_clear_error_and_a_resumable_checkpoint(tmp_path):
    "Bounded retries, then exit 1 naming the URL and the checkpoint; with Redis back, the rerun resumes the same run."
    from conftest import start_redis
    proc, url = start_redis(tmp_path)
    out, whole = tmp_path / "run", tmp_path / "whole"
    common = ["--n-conversations", "24", "--seed", "4", "--segment-conversations", "8", "--checkpoint-every", "1"]
    redis_args = ["--store", "redis", "--redis-url", url, "--set", "runtime.store_retries=3",
                  "--set", "runtime.store_backoff_s=0.05"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(PY + ["--out", str(out), *common, *redis_args, "--pace-s", "0.02"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not checkpoint_paths(out / "checkpoints") and p.poll() is None: time.sleep(0.05)
        assert p.poll() is None, "finished before Redis could be stopped: " + p.stderr.read()[-2000:]
        proc.kill(); proc.wait(timeout=10)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    err = p.stderr.read()
    assert rc == 1, (rc, err[-2000:])
    assert f"Redis at {url} is unreachable after 4 attempts" in err and "rerun with the same arguments to resume" in err
    assert "Traceback" not in err and not (out / "conversations.csv").exists()
    proc, _ = start_redis(tmp_path, port=_port(url))
    try:
        r = subprocess.run(PY + ["--out", str(out), *common, *redis_args], capture_output=True, text=True, env=env, timeout=120)
    finally:
        proc.kill(); proc.wait(timeout=10)
    assert r.returncode == 0 and "resumed_from=0 " not in r.stdout and "resumed_from=" in r.stdout, (r.stdout, r.stderr[-2000:])
    from rapo_nb.runtime import orchestrator_main
    assert orchestrator_main(["--out", str(whole), *common]) == 0                           # uninterrupted, memory store
    for name, cols in (("conversations", OUTCOME_CONV), ("turns", OUTCOME_TURN)):
        pd.testing.assert_frame_equal(pd.read_csv(out / f"{name}.csv")[cols], pd.read_csv(whole / f"{name}.csv")[cols])


def test_the_same_run_in_two_processes_does_not_share_a_default_folder(tmp_path):
    "While another live process holds a run's default folder, this process runs without checkpoints and leaves it be."
    import rapo_nb.runtime as R
    convs = CONVS[:4]
    folder = R.default_checkpoint_dir(Orchestrator(CFG, "rapo", 1), convs)
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
                               " fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (folder / "marker").write_text("theirs")
        turns, conv_df = run_conversations(convs, "rapo", CFG, seed=1)
        assert len(conv_df) == 4 and (folder / "marker").exists() and not checkpoint_paths(folder)
    finally:
        holder.kill(); holder.wait(timeout=10)
