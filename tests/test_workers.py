"""Workers against a real redis-server: the agent worker streams, malformed entries, dead-agent re-claim."""
import json, os, signal, subprocess, sys, threading, time
import numpy as np
import pytest
import redis
from rapo_nb.store import RedisStateStore, StoreUnavailable, connect_redis
from rapo_nb.workers import (AgentWorker, RedisDispatcher, agent_stream, results_stream, rejected_stream, GROUP, parse_task)

pytestmark = pytest.mark.redis

def _payload(i=0):
    return {"history": ["hello"], "context": "user: hello", "turn": dict(index=i, fsm_state="greeting", speaker="user", text="hi there",
                                                                         specialist="general", task=1, modality=2)}

def _echo(task):
    return dict(text=f"agent {task['agent']} answers {task['payload']['turn']['text']}", outcome="ok", success=True, latency_s=0.01)

def test_worker_answers_acks_and_rejects_malformed(redis_url):
    client = connect_redis(redis_url)
    d = RedisDispatcher(client, n_agents=2)
    w = AgentWorker(connect_redis(redis_url), 1, _echo, block_ms=20)
    d.submit(1, "c0:0:0", "c0", 0, _payload())
    client.xadd(agent_stream("rapo:v1", 1), {"task_id": "bad", "conv_id": "c1", "turn": "zero", "agent": "1", "payload": "{}"})
    d.submit(1, "c2:0:0", "c2", 0, _payload())
    handled = 0
    for _ in range(20):
        handled += w.step()
        if handled >= 3: break
    assert (w.processed, w.rejected) == (2, 1)
    got = d.poll(block_ms=100)
    assert sorted(r["task_id"] for r in got) == ["c0:0:0", "c2:0:0"] and all(r["agent"] == 1 for r in got)
    assert d.pending(1) == 0                                  # everything acknowledged
    rej = client.xrange(rejected_stream("rapo:v1"))
    assert len(rej) == 1 and b"turn" in rej[0][1][b"reason"]
    # a worker sending a malformed answer: the dispatcher rejects and logs it, the valid answer still comes through
    client.xadd(results_stream("rapo:v1"), {"task_id": "c3:0:0", "conv_id": "c3", "turn": "0", "agent": "1", "text": "x",
                                           "outcome": "exploded", "success": "1", "latency_s": "0.1"})
    d.submit(1, "c4:0:0", "c4", 0, _payload()); w.step()
    got = d.poll(block_ms=100)
    assert [r["task_id"] for r in got] == ["c4:0:0"] and d.rejected == 1

def test_dead_agent_pending_entries_are_reclaimed(redis_url):
    client = connect_redis(redis_url)
    d = RedisDispatcher(client, n_agents=3)
    for i in range(3): d.submit(0, f"c{i}:0:0", f"c{i}", 0, _payload(i))
    # a consumer reads two entries and dies without acknowledging them (never refreshes a heartbeat)
    client.xreadgroup(GROUP, "doomed", {agent_stream("rapo:v1", 0): ">"}, count=2)
    assert d.pending(0) == 2
    assert not d.alive()[0]
    tasks = d.reclaim(0)
    assert sorted(t["task_id"] for t in tasks) == ["c0:0:0", "c1:0:0", "c2:0:0"]   # 2 pending + 1 never read
    assert d.pending(0) == 0 and d.reclaim(0) == []                               # taken exactly once

AGENT = [sys.executable, "-c", "import sys; from rapo_nb.workers import agent_main; sys.exit(agent_main(sys.argv[1:]))"]

def _wait(cond, timeout=30.0, what=""):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)

@pytest.mark.slow
def test_kill_9_agent_worker_work_is_reclaimed_and_replaced_by_capability_similarity(redis_url, tmp_path):
    import torch
    from rapo_nb.config import load_config
    from rapo_nb.state import StateBank
    from rapo_nb.routing import AgentLoad
    from rapo_nb.synthetic import generate_conversations
    from rapo_nb.workers import recover_dead_agents
    cfg, n = load_config("quick"), 4
    procs = {}
    for a in (0, 2):     # workers for agents 0 and 2 only (1 and 3 have none: dead from the start); agent 0 is slow (sleeps 5000 × its simulated latency) so its entries are in flight when it dies
        procs[a] = subprocess.Popen(AGENT + ["--redis-url", redis_url, "--agent", str(a), "--n-agents", str(n), "--heartbeat-ms", "100",
                                             "--block-ms", "20", "--sleep-scale", "5000" if a == 0 else "0"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = connect_redis(redis_url)
        d = RedisDispatcher(client, n)
        _wait(lambda: d.alive()[[0, 2]].all(), what="workers to start")
        turns = generate_conversations(1, 0, cfg)[0].turns[:3]
        ids = []
        for i, t in enumerate(turns):
            p = {"history": [], "context": "", "turn": dict(index=t.index, fsm_state=t.fsm_state, speaker=t.speaker, text=t.text,
                                                           specialist=t.specialist, task=t.task, modality=t.modality)}
            ids.append(f"k:{i}"); d.submit(0, f"k:{i}", "k", i, p)
        _wait(lambda: d.pending(0) >= 1, what="agent 0 to read an entry")          # in flight (the rest may still be unread)
        os.kill(procs[0].pid, signal.SIGKILL); procs[0].wait(timeout=10)
        _wait(lambda: not d.alive()[0], what="agent 0's heartbeat to expire")
        assert d.pending(0) >= 1                                   # in flight, unacknowledged
        bank = StateBank.create(n, cfg, device="cpu", seed=0)
        g = torch.Generator().manual_seed(0)                        # give the agents distinct capability profiles
        bank.M = torch.rand(bank.M.shape, generator=g)
        bank.M[2] = bank.M[0] * 0.9 + 0.05                          # agent 2 is the most similar to agent 0
        z = torch.zeros(n)
        load = AgentLoad(active=z.clone(), pending=z.clone(), utilisation=z.clone(), alive=torch.ones(n, dtype=torch.bool))
        load.active[2] = 9.0                                        # ... and the most loaded: similarity, not load, decides
        moved = recover_dead_agents(d, bank, load)
        assert sorted(m["task_id"] for m in moved) == ids and {m["replacement"] for m in moved} == {2}
        assert d.pending(0) == 0 and not bool(bank.alive[0])
        got = []
        _wait(lambda: got.extend(d.poll(block_ms=50)) or len(got) >= 3, what="answers from the replacement")
        time.sleep(0.2); got += d.poll(block_ms=50)
        assert sorted(r["task_id"] for r in got) == ids                # each exactly once
        assert {r["agent"] for r in got} == {2}
    finally:
        for p in procs.values():
            if p.poll() is None: p.terminate()
        for p in procs.values():
            try: p.wait(timeout=20)
            except subprocess.TimeoutExpired: p.kill(); p.wait(timeout=10)

def test_rapo_agent_reports_unreachable_redis(capsys):
    "The console script's entry point (in-process: a subprocess would only add interpreter start-up time)."
    import socket
    from rapo_nb.workers import agent_main
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0)); port = sk.getsockname()[1]
    t0 = time.monotonic()
    assert agent_main(["--redis-url", f"redis://127.0.0.1:{port}/0", "--agent", "0", "--timeout-s", "0.5"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err and time.monotonic() - t0 < 5

def test_malformed_entry_is_logged(redis_url, caplog):
    client = connect_redis(redis_url)
    w = AgentWorker(connect_redis(redis_url), 0, _echo, block_ms=20)
    client.xadd(agent_stream("rapo:v1", 0), {"task_id": "t", "conv_id": "c", "turn": "0", "agent": "0", "payload": "[1, 2]"})
    with caplog.at_level("WARNING", logger="rapo_nb.workers"): w.step()
    assert w.rejected == 1 and any("payload" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)

def test_run_conversations_with_the_redis_store_from_config(redis_url):
    from rapo_nb.config import load_config
    from rapo_nb.synthetic import generate_conversations
    from rapo_nb.runtime import run_conversations
    from rapo_nb.store import make_store
    cfg = load_config("quick", overrides={"runtime.store": "redis", "runtime.redis_url": redis_url})
    store = make_store(cfg)
    assert isinstance(store, RedisStateStore)
    turns, convs = run_conversations(generate_conversations(4, 0, cfg), "rapo", cfg, store=store)
    ver, arrays = store.get("bank")
    assert ver == convs.attrs["run"]["ticks"] > 0 and set(arrays) >= {"P", "C", "M", "alive"}
