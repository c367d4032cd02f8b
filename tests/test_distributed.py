"""A distributed run, exactly once, with real processes: `rapo-agent` workers on a real redis-server (loopback, free
port), killed with SIGKILL, paused with SIGSTOP, two of them on one agent; and the in-process run reproduced turn for
turn by the Redis run. Every wait is bounded."""
import json, os, signal, subprocess, sys, threading, time
import pytest
from rapo_nb.config import load_config
from rapo_nb.store import connect_redis
from rapo_nb.synthetic import generate_conversations
from rapo_nb.workers import GROUP, RedisDispatcher, agent_stream, results_stream

pytestmark = [pytest.mark.redis, pytest.mark.slow]
AGENT = [sys.executable, "-c", "import sys; from rapo_nb.workers import agent_main; sys.exit(agent_main(sys.argv[1:]))"]
CFG = load_config("quick")
N = CFG.evaluation.n_agents


def _wait(cond, timeout=40.0, what=""):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def spawn(redis_url, tmp_path):
    "Start `rapo-agent` processes (logs in tmp_path; stopped by pid afterwards, SIGCONT first in case one is paused)."
    procs = []

    def start(agents, consumer, *extra):
        log = open(tmp_path / f"{consumer}.log", "w")
        p = subprocess.Popen(AGENT + ["--redis-url", redis_url, "--agent", str(agents), "--consumer", consumer,
                                      "--block-ms", "20", *extra], stdout=subprocess.DEVNULL, stderr=log)
        procs.append(p)
        return p

    yield start
    _stop(procs)


def _stop(procs) -> None:
    "Stop worker processes by pid: SIGCONT a paused one, terminate, then kill what does not exit in 15 s."
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _payload(turn):
    return {"history": [], "context": "", "turn": dict(index=turn.index, fsm_state=turn.fsm_state, speaker=turn.speaker,
                                                        text=turn.text, specialist=turn.specialist, task=turn.task,
                                                        modality=turn.modality)}


def _answers(client):
    "Every answer ever published on the results stream: task id → how many times."
    out = {}
    for _, f in client.xrange(results_stream("rapo:v1")):
        out[f[b"task_id"].decode()] = out.get(f[b"task_id"].decode(), 0) + 1
    return out


def _held(client, consumers, agents=range(N)):
    "(consumer, entry id, agent) of a turn pending under one of `consumers`, or None."
    for a in agents:
        for p in client.xpending_range(agent_stream("rapo:v1", a), GROUP, "-", "+", 10):
            if p["consumer"].decode() in consumers:
                return p["consumer"].decode(), p["message_id"], a
    return None


def _freeze_then_kill(client, procs, held) -> dict:
    "SIGSTOP the holder; if the turn is still pending under it (it can no longer answer), SIGKILL it; else resume it."
    name, entry, a = held
    os.kill(procs[name].pid, signal.SIGSTOP)
    still = client.xpending_range(agent_stream("rapo:v1", a), GROUP, entry, entry, 1, consumername=name)
    if still:
        os.kill(procs[name].pid, signal.SIGKILL)
        procs[name].wait(timeout=10)
        return dict(name=name, entry=entry, agent=a)
    os.kill(procs[name].pid, signal.SIGCONT)
    return {}


def _submit_tasks(d, k, agent=0, tag="t"):
    turns = [t for c in generate_conversations(4, 0, CFG) for t in c.turns][:k]
    ids = [f"{tag}{i}" for i in range(k)]
    for i, t in zip(ids, turns):
        d.submit(agent, i, "c", 0, _payload(t))
    return ids


def test_two_healthy_workers_on_one_agent_answer_each_task_once(redis_url, spawn):
    "Today's code: the second worker XAUTOCLAIMs entries still waiting in the first one's batch; both answer them."
    client = connect_redis(redis_url)
    d = RedisDispatcher(client, 4)
    for c in ("a", "b"):  # ~0.03–0.3 s per answer (5 × the simulated latency)
        spawn(0, c, "--n-agents", "4", "--sleep-scale", "5", "--heartbeat-ms", "100")
    _wait(lambda: d.alive()[0], what="the workers to start")
    time.sleep(1.0)  # both workers reading
    ids = _submit_tasks(d, 30)
    _wait(lambda: set(_answers(client)) >= set(ids), timeout=40, what="30 answers")
    time.sleep(1.5)  # room for late second answers
    got = _answers(client)
    assert sorted(got) == sorted(ids) and max(got.values()) == 1, f"answered twice: {[t for t, n in got.items() if n > 1]}"
    assert client.xpending(agent_stream("rapo:v1", 0), GROUP)["pending"] == 0


def test_paused_worker_late_answers_are_discarded(redis_url, spawn):
    "SIGSTOP past its heartbeat: a sibling takes its entries over; after SIGCONT its answers are dropped, not published."
    client = connect_redis(redis_url)
    d = RedisDispatcher(client, 4)
    ids = _submit_tasks(d, 5)  # queued before the first worker starts: it reads all five in one batch
    slow = spawn(0, "paused", "--n-agents", "4", "--sleep-scale", "20", "--heartbeat-ms", "100")
    _wait(lambda: d.pending(0) == 5, what="the first worker to read all five tasks")
    os.kill(slow.pid, signal.SIGSTOP)  # mid-answer: five entries pending under it
    spawn(0, "sibling", "--n-agents", "4", "--heartbeat-ms", "100")
    _wait(lambda: set(_answers(client)) >= set(ids), what="the sibling to answer the five tasks")
    os.kill(slow.pid, signal.SIGCONT)
    time.sleep(2.5)  # the resumed worker finishes its (late) answers
    got = _answers(client)
    assert sorted(got) == sorted(ids) and max(got.values()) == 1, f"answered twice: {[t for t, n in got.items() if n > 1]}"
    workers = {f[b"worker"].decode() for _, f in client.xrange(results_stream("rapo:v1"))}
    assert workers == {"sibling"}


@pytest.fixture(scope="module")
def reference():
    "The in-process run (same seed, same simulated agents, 5% injected failures)."
    from rapo_nb.runtime import Orchestrator
    convs = generate_conversations(12, 0, CFG)
    return convs, Orchestrator(CFG, "rapo", 0, failure_rate=0.05).run(convs)


def _same_outcomes(a, b):
    "Turn and conversation tables equal except the measured wall-clock overhead."
    (ta, ca), (tb, cb) = a, b
    cols = [c for c in ta.columns if c != "overhead_ms"]
    assert ta[cols].equals(tb[cols]), ta[cols].compare(tb[cols]).head()
    ccols = [c for c in ca.columns if c != "response_time_ms"]
    assert ca[ccols].equals(cb[ccols])


def test_redis_run_equals_in_process_run_and_survives_kill_9_of_a_worker(redis_url, spawn, reference):
    "Two workers host all agents; one is killed (SIGKILL) while it holds a turn: re-claimed, every turn once."
    from rapo_nb.runtime import RedisOrchestrator
    convs, ref = reference
    common = ["--failure-rate", "0.05", "--heartbeat-ms", "100", "--sleep-scale", "1"]
    procs = {c: spawn(f"0-{N - 1}", c, *common) for c in ("w0", "w1")}
    client = connect_redis(redis_url)
    orch = RedisOrchestrator(CFG, "rapo", 0, redis_url=redis_url, failure_rate=0.05, wait_s=30)
    killed = {}

    def killer():  # once 20 turns are answered, SIGKILL a worker while it holds a pending turn
        try:
            _wait(lambda: client.xlen(results_stream("rapo:v1")) >= 20, what="20 answers")
            while not killed:
                held = _held(client, set(procs))
                if held:
                    killed.update(_freeze_then_kill(client, procs, held))
                time.sleep(0.002)
        except AssertionError:
            pass

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    got = orch.run(convs)
    th.join(timeout=5)
    assert killed, "no worker was killed mid-run"
    _same_outcomes(ref, got)
    answers = _answers(client)
    assert max(answers.values()) == 1 and len(answers) == orch.pool.dispatched  # each dispatched turn answered once
    e = client.xrange(agent_stream("rapo:v1", killed["agent"]), killed["entry"], killed["entry"])[0][1]
    survivor = ({"w0", "w1"} - {killed["name"]}).pop()
    by = {f[b"task_id"]: f[b"worker"].decode() for _, f in client.xrange(results_stream("rapo:v1"))}
    assert by[e[b"task_id"]] == survivor  # the killed worker's pending turn was re-claimed and answered once


def test_all_workers_of_agents_gone_turns_move_to_the_most_similar_agent(redis_url, spawn):
    "Workers for agents 0–5 and 6–11; the first is killed: its turns go to replacements by capability similarity."
    from rapo_nb.runtime import RedisOrchestrator
    convs = generate_conversations(10, 1, CFG)
    procs = {"low": spawn(f"0-{N // 2 - 1}", "low", "--heartbeat-ms", "100", "--sleep-scale", "5")}
    spawn(f"{N // 2}-{N - 1}", "high", "--heartbeat-ms", "100", "--sleep-scale", "1")
    client = connect_redis(redis_url)
    orch = RedisOrchestrator(CFG, "rapo", 0, redis_url=redis_url, wait_s=30)
    state = {}

    def killer():  # SIGKILL the worker of agents 0-5 while it holds a turn
        try:
            _wait(lambda: client.xlen(results_stream("rapo:v1")) >= 10, what="10 answers")
            while "after" not in state:
                held = _held(client, {"low"}, range(N // 2))
                if held and _freeze_then_kill(client, procs, held):
                    state["after"] = client.xlen(results_stream("rapo:v1"))
                time.sleep(0.002)
        except AssertionError:
            pass

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    turns, conv_df = orch.run(convs)
    th.join(timeout=5)
    assert "after" in state, "the worker of agents 0-5 was not killed mid-run"
    assert len(turns) == sum(len(c.turns) for c in convs) and not turns.duplicated(["conv_id", "turn"]).any()
    answers = _answers(client)
    assert max(answers.values()) == 1
    late = [f for _, f in client.xrange(results_stream("rapo:v1"))][state["after"]:]
    assert late and all(int(f[b"agent"]) >= N // 2 for f in late)  # after the kill only agents 6-11 answer
    assert orch.pool.moved and set(orch.workers_down) >= {m["failed"] for m in orch.pool.moved}
    assert all(m["replacement"] >= N // 2 for m in orch.pool.moved) and orch.replacements >= 1


def test_a_task_the_worker_refuses_fails_the_run_at_once_naming_the_reason(redis_url):
    "A worker whose simulated pool differs (another seed) rejects the turn; the orchestrator says so, it does not hang."
    from rapo_nb.runtime import RedisOrchestrator
    from rapo_nb.workers import NoWorker
    from rapo_nb.workers import AgentWorker, simulated_handler
    other = AgentWorker(connect_redis(redis_url), range(N), simulated_handler(N, CFG, seed=1), block_ms=20)
    th = threading.Thread(target=other.run, daemon=True)  # the worker loop in a thread: the point is the orchestrator
    th.start()
    try:
        orch = RedisOrchestrator(CFG, "rapo", 0, redis_url=redis_url, wait_s=30)
        t0 = time.monotonic()
        with pytest.raises(NoWorker, match="payload.pool"):
            orch.run(generate_conversations(2, 0, CFG))
        assert time.monotonic() - t0 < 10 and other.rejected >= 1
    finally:
        other.stop()
        th.join(timeout=10)


def test_worker_joins_over_tls_with_an_acl_user_and_password(tmp_path, capsys):
    "A worker on another host: rediss:// with a CA file, an ACL user limited to the rapo:v1:* keys, a password."
    import shutil
    from conftest import free_port
    exe, ossl = shutil.which("redis-server"), shutil.which("openssl")
    if exe is None or ossl is None:
        pytest.skip("redis-server or openssl not installed: the TLS + ACL test is skipped")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([ossl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", tmp_path, "--tls-cert-file", cert, "--tls-key-file", key,
                               "--tls-ca-cert-file", cert, "--tls-auth-clients", "no", "--user", "default", "off",
                               "--user", "rapo", "on", ">s3cret", "~rapo:v1:*", "+@all", "-@dangerous"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"rediss://rapo:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    worker = None
    try:
        client = None
        for _ in range(100):
            if server.poll() is not None:
                pytest.fail(f"redis-server with TLS did not start: {server.stderr.read().decode()[-300:]}")
            try:
                client = connect_redis(url, 0.5)
                break
            except Exception:
                time.sleep(0.05)
        assert client is not None, "could not connect over TLS with the ACL user"
        with pytest.raises(Exception, match="no permissions"):
            client.set("elsewhere", 1)  # the ACL user reaches only the rapo:v1:* keys
        from rapo_nb.workers import agent_main  # a wrong password: refused before serving, naming the address
        assert agent_main(["--redis-url", url.replace("s3cret", "wrong"), "--agent", "0", "--n-agents", "4"]) == 2
        assert f"127.0.0.1:{port}" in capsys.readouterr().err
        d = RedisDispatcher(client, 4)
        ids = _submit_tasks(d, 3, agent=2)
        worker = subprocess.Popen(AGENT + ["--agent", "0-3", "--n-agents", "4", "--max-messages", "3", "--block-ms", "20"],
                                  env={**os.environ, "RAPO_REDIS_URL": url}, stderr=subprocess.PIPE, text=True)
        got = []
        _wait(lambda: got.extend(d.poll(block_ms=50)) or len(got) >= 3, what="three answers over TLS")
        assert sorted(r["task_id"] for r in got) == sorted(ids) and {r["agent"] for r in got} == {2}
        assert worker.wait(timeout=30) == 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
        server.kill()
        server.wait(timeout=10)


def test_worker_rides_out_a_redis_restart_then_gives_up_naming_the_address(tmp_path):
    "Redis killed and restarted (append-only file): the worker retries and goes on; Redis gone for good: exit 3."
    from conftest import start_redis
    proc, url = start_redis(tmp_path, persist=True)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    worker = subprocess.Popen(AGENT + ["--redis-url", url, "--agent", "0", "--n-agents", "4", "--block-ms", "20",
                                       "--heartbeat-ms", "100", "--redis-retry-s", "3"], stderr=open(tmp_path / "err", "w"))
    try:
        d = RedisDispatcher(connect_redis(url), 4)
        ids, got = _submit_tasks(d, 2), []
        _wait(lambda: got.extend(d.poll(block_ms=50)) or len(got) >= 2, what="two answers")
        proc.kill()
        proc.wait(timeout=10)
        time.sleep(1.0)  # Redis down for a second
        assert worker.poll() is None, f"the worker exited while Redis was down: {(tmp_path / 'err').read_text()[-300:]}"
        proc, _ = start_redis(tmp_path, port=port, persist=True)
        d = RedisDispatcher(connect_redis(url), 4)
        more, got = _submit_tasks(d, 2, tag="u"), []
        _wait(lambda: got.extend(d.poll(block_ms=50)) or len(got) >= 2, what="answers after the restart")
        assert sorted(r["task_id"] for r in got) == more
        proc.kill()
        proc.wait(timeout=10)
        assert worker.wait(timeout=30) == 3
        assert f"127.0.0.1:{port}" in (tmp_path / "err").read_text().splitlines()[-1]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)



@pytest.fixture
def blip_run(request, tmp_path):
    """Redis (param: with an append-only file, else none) and two `rapo-agent` workers hosting every agent; `kill()`
    SIGKILLs redis-server, `restart(after_s)` starts it again on the same port in a thread. Stopped by pid afterwards."""
    from conftest import start_redis
    persist = getattr(request, "param", False)
    state = {}
    state["redis"], url = start_redis(tmp_path, persist=persist)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    procs = [subprocess.Popen(AGENT + ["--redis-url", url, "--agent", f"0-{N - 1}", "--consumer", c, "--block-ms", "20",
                                       "--heartbeat-ms", "100", "--failure-rate", "0.05", "--sleep-scale", "1",
                                       "--redis-retry-s", "40"], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / f"{c}.log", "w")) for c in ("w0", "w1")]
    client = connect_redis(url)

    def kill():
        state["redis"].kill()
        state["redis"].wait(timeout=10)
        state["killed_at"] = time.monotonic()

    def restart(after_s):
        def later():
            time.sleep(after_s)
            state["redis"], _ = start_redis(tmp_path, port=port, persist=persist)
            state["restarted"] = True
        threading.Thread(target=later, daemon=True).start()

    def busy():  # 20 turns answered: the run is well under way
        return "killed_at" not in state and client.xlen(results_stream("rapo:v1")) >= 20

    state.update(url=url, port=port, kill=kill, restart=restart, busy=busy)
    yield state
    _stop(procs)
    if state["redis"].poll() is None:
        state["redis"].kill()
        state["redis"].wait(timeout=10)


def _kill_in_thread(blip_run, restart_after_s):
    "Kill Redis from a thread at whatever the orchestrator is doing once 20 turns are answered."
    def go():
        _wait(blip_run["busy"], what="20 answers")
        blip_run["kill"]()
        if restart_after_s is not None:
            blip_run["restart"](restart_after_s)
    threading.Thread(target=go, daemon=True).start()


def _kill_at_a_tick(blip_run, orch):
    "Kill Redis inside the control loop, just before its heartbeat read (the orchestrator is not waiting on a turn)."
    def tick():
        if blip_run["busy"]():
            blip_run["kill"]()
            blip_run["restart"](1.0)
        type(orch)._tick(orch)
    orch._tick = tick


@pytest.mark.parametrize("blip_run, where", [(False, "thread"), (True, "tick")], indirect=["blip_run"],
                         ids=["restart-empty-at-any-moment", "restart-from-aof-at-a-control-tick"])
def test_orchestrator_rides_out_a_redis_restart(blip_run, where, reference):
    """redis-server SIGKILLed mid-run, back 1 s later (empty, or from its append-only file): the awaited turn is re-sent
    (idempotent by turn id); the outcomes equal the in-process run's and every turn is published once."""
    from rapo_nb.runtime import RedisOrchestrator
    convs, ref = reference
    orch = RedisOrchestrator(CFG, "rapo", 0, redis_url=blip_run["url"], failure_rate=0.05, wait_s=30)
    if where == "tick":
        _kill_at_a_tick(blip_run, orch)
    else:
        _kill_in_thread(blip_run, 1.0)
    got = orch.run(convs)
    _wait(lambda: "restarted" in blip_run, timeout=10, what="the restart")
    assert orch.pool.resubmitted >= 1, "the run did not meet the outage"
    _same_outcomes(ref, got)
    assert orch.dispatcher.duplicates == 0 and not orch.workers_down
    answers = _answers(connect_redis(blip_run["url"]))  # the restarted server's results stream: each turn once
    assert answers and max(answers.values()) == 1
    if where == "tick":  # the server kept its data: every dispatched turn is there, answered once
        assert len(answers) == orch.pool.dispatched


def test_orchestrator_gives_up_naming_the_redis_url_when_redis_stays_down(blip_run, reference):
    "redis-server SIGKILLed mid-run and not restarted: `StoreUnavailable` naming the address, within the retry budget."
    from rapo_nb.runtime import RedisOrchestrator
    from rapo_nb.store import StoreUnavailable
    convs, _ = reference
    orch = RedisOrchestrator(CFG, "rapo", 0, redis_url=blip_run["url"], failure_rate=0.05, wait_s=30)
    _kill_in_thread(blip_run, None)
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{blip_run['port']}"):
        orch.run(convs)
    assert time.monotonic() - blip_run["killed_at"] < 20  # the budget (cfg.runtime.store_*: ~6 s), not wait_s
