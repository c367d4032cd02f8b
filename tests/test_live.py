"""rapo-live against a scripted OpenAI-compatible server on loopback: judge, retries, budget stop, resume after kill -9,
torn ledger lines. The server runs in a subprocess started here (free port) and stopped by its pid."""

import asyncio, json, os, signal, subprocess, sys, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import httpx

from rapo_nb.config import load_config
from rapo_nb.live import (
    Budget,
    BudgetExceeded,
    Ledger,
    LiveAgent,
    fact_recall,
    facts_due,
    judge_table,
    messages_hash,
    scripted_answer,
)
from rapo_nb.synthetic import generate_conversations

PY = sys.executable
LIVE = [PY, "-c", "import sys; from rapo_nb.live import main; sys.exit(main())"]


@pytest.fixture
def server(request):
    "Start the scripted server in a subprocess with the given CLI flags; yield (base_url, stats())."
    procs = []

    def start(*flags):
        cmd = [PY, "-c", "from rapo_nb.live import scripted_main; scripted_main()", "--port", "0", *flags]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line.startswith("PORT "), f"scripted server did not start: {line!r}"
        port = int(line.split()[1])

        def stats():
            return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()

        return f"http://127.0.0.1:{port}/v1", stats

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def _ask(agent, n=1):
    msgs = [{"role": "user", "content": "hello . Focus: Kakaran ."}]
    meta = dict(system="t", seed=0, conv_id="c0", turn=0, agent=0)
    return asyncio.run(agent.ask(msgs, meta))


# ---- the judge ---------------------------------------------------------------------------------------------------
def test_fact_recall_on_hand_made_texts():
    facts = ["Kakaran funds Mikavek", "Nituran controls Mirafel"]
    assert fact_recall(facts, "so: kakaran FUNDS mikavek; and Nituran controls Mirafel.") == 1.0
    assert fact_recall(facts, "Kakaran funds Mikavek only") == 0.5
    assert fact_recall(facts, "Mikavek funds Kakaran") == 0.0  # direction matters
    assert np.isnan(fact_recall([], "anything"))
    conv = next(c for c in generate_conversations(40, 0, load_config("quick")) if c.facts)
    said_at = min(k for k, t in enumerate(conv.turns) if conv.facts[0] in t.text)
    assert conv.facts[0] not in facts_due(conv, said_at - 1) if said_at else True
    assert conv.facts[0] in facts_due(conv, said_at)


def test_scripted_answer_keeps_and_drops_on_purpose():
    msgs = [{"role": "system", "content": "Kakaran funds Mikavek ."}, {"role": "user", "content": "Focus: Mikavek ."}]
    assert scripted_answer(msgs, drop=0.0) == "On Mikavek : Kakaran funds Mikavek ."
    assert "funds" not in scripted_answer(msgs, drop=1.0)


def _frames(system, second_text, clarify):
    cols = dict(system=system, seed=0, fsm_state="x", specialist="general", context_given="", overhead_ms=0.0)
    first = "entity Kakaran funds Mikavek and Mikavek hosts Nituran so Kakaran reaches Nituran"
    rows = [
        dict(cols, conv_id="c0", turn=0, agent=0, handoff=False, prev_agent=-1, prev_response="", response=first),
        dict(
            cols, conv_id="c0", turn=1, agent=1, handoff=True, prev_agent=0, prev_response=first, response=second_text
        ),
    ]
    for r in rows:
        r.update(service_ms=10.0, clarification=clarify and r["turn"] == 1, outcome="ok")
    turns = pd.DataFrame(rows)
    convs = pd.DataFrame(
        [
            dict(
                system=system,
                seed=0,
                conv_id="c0",
                task_type="t",
                n_turns=2,
                n_handoffs=1,
                depth=1,
                n_entities=3,
                inference_steps=1,
                response_time_ms=20.0,
                rule_success=not clarify,
                failure_type=None,
                final_fact_recall=1.0 if not clarify else 0.0,
            )
        ]
    )
    return turns, convs


def test_judge_scores_a_kept_and_a_lost_handoff():
    cfg = load_config("quick")
    kept = "entity Kakaran funds Mikavek and Mikavek hosts Nituran so Kakaran reaches Nituran"
    t1, c1 = _frames("good", kept, False)
    t2, c2 = _frames("bad", "could you clarify which entities you mean", True)
    tab = judge_table(pd.concat([t1, t2]), pd.concat([c1, c2]), cfg, ["good", "bad"], "hand-made").set_index("system")
    assert tab.loc["good", "context_score"] == pytest.approx(1.0)
    assert tab.loc["good", "handoff_success"] == 1.0 and tab.loc["good", "task_success"] == 1.0
    assert tab.loc["bad", "context_score"] < 0.2
    assert tab.loc["bad", "handoff_success"] == 0.0 and tab.loc["bad", "task_success"] == 0.0
    assert tab.loc["bad", "fact_recall"] == 0.0


# ---- retries, the ledger -----------------------------------------------------------------------------------------
def test_retries_on_429_and_5xx_with_backoff(server, tmp_path):
    base, stats = server("--fail-first", "3", "--fail-status", "429,500,503")
    led = Ledger(tmp_path / "l.jsonl")
    agent = LiveAgent(base, "scripted", led, Budget(), retries=3, backoff_s=0.1, timeout=10)
    rec = _ask(agent)
    assert rec["status"] == "ok" and rec["attempt"] == 4
    assert stats()["requests"] == 4
    recs = led.records()
    assert [r.get("http_status") for r in recs] == [429, 500, 503, 200]
    gaps = np.diff([r["t"] - r["latency_ms"] / 1000 for r in recs])  # start of each attempt
    assert (gaps >= np.array([0.1, 0.2, 0.4]) - 0.02).all(), gaps  # exponential backoff
    # the answer is now in the ledger: asking again does not reach the server
    assert _ask(agent)["replayed"] and stats()["requests"] == 4


def test_retries_are_bounded_and_4xx_is_not_retried(server, tmp_path):
    base, stats = server("--fail-first", "10", "--fail-status", "500")
    agent = LiveAgent(base, "scripted", Ledger(tmp_path / "a.jsonl"), Budget(), retries=2, backoff_s=0.01)
    rec = _ask(agent)
    assert rec["status"] == "error" and rec["attempt"] == 3 and "HTTP 500" in rec["error"]
    base4, stats4 = server("--fail-first", "10", "--fail-status", "400")
    agent4 = LiveAgent(base4, "scripted", Ledger(tmp_path / "b.jsonl"), Budget(), retries=2, backoff_s=0.01)
    rec4 = _ask(agent4)
    assert rec4["status"] == "error" and rec4["attempt"] == 1 and stats4()["requests"] == 1


def test_budget_refuses_new_requests(server, tmp_path):
    base, stats = server()
    agent = LiveAgent(base, "scripted", Ledger(tmp_path / "l.jsonl"), Budget(max_requests=0))
    with pytest.raises(BudgetExceeded, match="request budget"):
        _ask(agent)
    assert stats()["requests"] == 0


def test_torn_ledger_line_is_ignored_with_a_warning(tmp_path):
    p = tmp_path / "requests.jsonl"
    led = Ledger(p)
    led.append(dict(key="k1", status="ok", response="a"))
    led.close()
    with open(p, "ab") as f:
        f.write(b'{"key": "k2", "status": "ok", "resp')
    with pytest.warns(UserWarning, match=r"requests\.jsonl:2: torn"):
        led = Ledger(p)
    assert set(led.answered) == {"k1"}
    led.append(dict(key="k3", status="ok", response="c"))
    led.close()
    with pytest.warns(UserWarning, match=r"requests\.jsonl:2"):
        assert set(Ledger(p).answered) == {"k1", "k3"}


# ---- the command: budget stop, kill -9 and resume -----------------------------------------------------------------
def _live(base, out, *flags, **kw):
    cmd = LIVE + ["--base-url", base, "--model", "scripted", "--out", str(out), "--no-progress", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


def test_budget_stops_the_command_cleanly(server, tmp_path):
    base, stats = server()
    r = _live(
        base, tmp_path, "--conversations", "6", "--systems", "rapo,sequential", "--max-requests", "30", "--no-simulated"
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "stopped by the budget" in r.stdout and "partial" in r.stdout
    assert stats()["requests"] == 30
    recs = Ledger(tmp_path / "requests.jsonl").records()
    assert len(recs) == 30 and all(x["status"] == "ok" for x in recs)
    assert "PARTIAL" in (tmp_path / "table1_live.md").read_text()


def test_resume_after_kill_9_asks_no_answered_turn_again(server, tmp_path):
    base, stats = server("--delay-s", "0.03")
    flags = ("--conversations", "8", "--systems", "rapo,sequential,p4_ll", "--concurrency", "2")
    cmd = LIVE + ["--base-url", base, "--model", "scripted", "--out", str(tmp_path), "--no-progress", *flags]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger = tmp_path / "requests.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if ledger.exists() and ledger.read_bytes().count(b"\n") >= 40:
            break
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kill may have torn the last line
        before = Ledger(ledger).records()
    answered_before = {messages_hash(r["request"]["messages"]) for r in before if r["status"] == "ok"}
    s1 = stats()
    assert 40 <= len(answered_before) < s1["requests"] + 1
    r = _live(base, tmp_path, *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    s2 = stats()
    for h in answered_before:  # not one answered turn was asked again
        assert s2["answered"][h] == s1["answered"][h]
    turns = pd.read_csv(tmp_path / "turns.csv")
    n_turns = sum(len(c.turns) for c in generate_conversations(8, 0, load_config("quick"))) * 3
    assert len(turns) == n_turns
    assert turns.replayed.sum() == len(answered_before)  # the schedule is deterministic: every answer is reused
    assert s2["requests"] - s1["requests"] == n_turns - turns.replayed.sum()
    tab = pd.read_csv(tmp_path / "table1_live.csv")
    assert set(tab.source) == {"live: scripted", "simulated agents", "paper"}
    assert (tmp_path / "table1_live.png").stat().st_size > 1000
