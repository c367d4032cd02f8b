"""The goal service (seed 004) over real HTTP: `rapo-service` processes on free loopback ports, a real redis-server.

The fault tests (issue #22) each reproduce what a user met: load, a killed instance, two instances, a Redis blip,
a huge body, no key, the environment read at import. Every wait is bounded."""
import asyncio, contextlib, json, os, signal, socket, subprocess, sys, time
from collections import Counter
from pathlib import Path
import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from rapo_nb.config import load_config
from rapo_nb.store import StoreUnavailable
from rapo_nb.service import ACTIVE, CHANNEL_ALL, app_from_env, create_app, events_key, goal_key, main, steps_key

ROOT = Path(__file__).resolve().parents[1]
_CLI = Path(sys.executable).with_name("rapo-service")  # the console script of the installed package
SERVICE = [str(_CLI)] if _CLI.exists() else [sys.executable, "-c", "from rapo_nb.service import main; main()"]
DEVOPS = "Deploy the api and web services to staging: build them, run the tests, and roll back on failure."
DOCS3 = "Process the invoice, contract and receipt received this week: classify, extract and validate them."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(redis_url: str, tmp_path: Path, *flags: str, env: dict | None = None, port: int | None = None):
    "Start `rapo-service --redis-url … <flags>` on a free port without waiting; returns (process, base URL, log)."
    port = port or free_port()
    log = tmp_path / f"service_{port}.log"
    env = dict(os.environ, RAPO_DEVICE="cpu", **(env or {}))
    cmd = [*SERVICE, "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def ready(proc, base: str, log: Path, timeout_s: float = 60.0):
    "Wait until /health answers; returns (process, base URL). Several launched processes import in parallel."
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    pytest.fail(f"the service did not start on {base}; log:\n{log.read_text()[-3000:]}")


def start_service(redis_url: str, tmp_path: Path, *flags: str, env: dict | None = None, port: int | None = None):
    return ready(*launch(redis_url, tmp_path, *flags, env=env, port=port))


def stop(proc) -> None:
    "SIGKILL: no clean shutdown, as a crashed or OOM-killed instance."
    proc.kill()
    proc.wait(timeout=10)


def wait_terminal(base: str, gid: str, timeout_s: float = 30.0, headers: dict | None = None) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        st = httpx.get(f"{base}/goal/{gid}", timeout=5, headers=headers).json()
        if st["status"] in ("done", "failed"):
            return st
        time.sleep(0.05)
    raise AssertionError(f"goal {gid} not finished after {timeout_s}s: {st}")


def wait_all_terminal(r: redis.Redis, ids: list[str], timeout_s: float) -> dict[str, str]:
    "Status of every goal, read from Redis, once all are terminal (AssertionError naming the stragglers otherwise)."
    t0 = time.monotonic()
    while True:
        with r.pipeline() as p:
            for gid in ids:
                p.hget(goal_key(gid), "status")
            st = {gid: (s or b"<missing>").decode() for gid, s in zip(ids, p.execute())}
        left = {g: s for g, s in st.items() if s not in ("done", "failed")}
        if not left:
            return st
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{len(left)} of {len(ids)} accepted goals not finished after {timeout_s}s: "
                                 f"{Counter(left.values())}")
        time.sleep(0.1)


def assert_ran_once(r: redis.Redis, gid: str) -> list[str]:
    "Every stored subtask has exactly one step event, nothing else ran, and the goal ended once, cleanly."
    events = [json.loads(x) for x in r.lrange(events_key(gid), 0, -1)]
    kinds = [e["event"] for e in events]
    steps = Counter(e["subtask"] for e in events if e["event"] == "step")
    stored = {k.decode() for k in r.hkeys(steps_key(gid))}
    assert set(steps) == stored and all(n == 1 for n in steps.values()), (gid, steps, stored)
    assert sum(k in ("done", "failed") for k in kinds) == 1 and kinds[-1] in ("done", "failed"), (gid, kinds)
    assert r.hget(goal_key(gid), "error") is None, (gid, r.hget(goal_key(gid), "error"))  # no error recorded on it
    assert not r.sismember(ACTIVE, gid)
    return kinds


async def post_many(base: str, payloads: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    "All POSTs at once, each on its own connection."
    limits = httpx.Limits(max_connections=len(payloads), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60, headers=headers) as c:
        return await asyncio.gather(*(c.post("/goal", json=p) for p in payloads))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One redis-server and one service process shared by the tests that do not restart anything.
    It is started as issue #22's user did: a malformed RAPO_REDIS_URL in the environment and the right --redis-url."""
    from conftest import start_redis

    tmp = tmp_path_factory.mktemp("service")
    rproc, url = start_redis(tmp)
    try:
        proc, base = start_service(url, tmp, env=dict(RAPO_REDIS_URL="localhost:6379"))
        yield base, redis.Redis.from_url(url)
        stop(proc)
    finally:
        rproc.kill()
        rproc.wait(timeout=10)


@pytest.mark.redis
def test_goal_runs_with_results_in_redis_and_progress_on_pubsub(service):
    base, r = service
    sub = r.pubsub()
    sub.subscribe(CHANNEL_ALL)
    sub.get_message(timeout=2)
    resp = httpx.post(base + "/goal", json=dict(goal=DEVOPS, failure_rate=0.2, seed=3), timeout=10)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    gid = body["id"]
    assert body["domain"] == "devops" and body["n_subtasks"] == 6
    st = wait_terminal(base, gid)
    assert st["plan"]["items"] == ["api", "web"] and st["simulated"] is True
    assert st["result"]["valid"] == (st["status"] == "done") and st["runs"] == 1
    # every finished step is in the scratchpad hash, exactly as returned
    stored = {k.decode(): json.loads(v) for k, v in r.hgetall(steps_key(gid)).items()}
    assert stored == st["steps"] and st["n_done"] == len(stored) > 0
    assert all(rec["attempts"] == len(rec["log"]) >= 1 for rec in stored.values())
    events = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not events or events[-1]["event"] not in ("done", "failed")):
        m = sub.get_message(timeout=0.5)
        if m and m["type"] == "message":
            e = json.loads(m["data"])
            if e["id"] == gid:
                events.append(e)
    sub.close()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "planned" and kinds[-1] == st["status"]
    assert sorted(e["subtask"] for e in events if e["event"] == "step") == sorted(stored)
    assert [json.loads(x)["event"] for x in r.lrange(events_key(gid), 0, -1)] == kinds  # the event log
    assert not r.sismember(ACTIVE, gid)
    assert r.hget(goal_key(gid), "status").decode() == st["status"]


@pytest.mark.redis
def test_bad_requests_get_4xx_with_a_clear_message(service):
    base, _ = service
    cases = [
        (dict(goal=""), 422, "goal"),
        (dict(goal="Bake a chocolate cake"), 422, "goal: cannot map"),
        (dict(goal="Deploy everything"), 422, "goal: a devops goal must name"),
        (dict(goal=DEVOPS, failure_rate=2), 422, "failure_rate"),
        (dict(goal=DEVOPS, seed=-1), 422, "seed"),
        (dict(goal=DEVOPS, colour="red"), 422, "colour"),
        (dict(), 422, "goal"),
    ]
    for payload, code, text in cases:
        resp = httpx.post(base + "/goal", json=payload, timeout=10)
        assert resp.status_code == code and text in resp.json()["detail"], (payload, resp.status_code, resp.text)
    resp = httpx.post(base + "/goal", content=b"not json", headers={"content-type": "application/json"}, timeout=10)
    assert resp.status_code == 422 and "body" in resp.json()["detail"]
    resp = httpx.get(base + "/goal/" + "a" * 32, timeout=10)
    assert resp.status_code == 404 and "no goal" in resp.json()["detail"]
    resp = httpx.get(base + "/goal/nope", timeout=10)
    assert resp.status_code == 422 and "goal_id" in resp.json()["detail"]


@pytest.mark.redis
def test_docs_need_no_cdn(service):
    "FastAPI's /docs and /redoc pull their scripts from a CDN: not served; the schema itself is."
    base, _ = service
    for path in ("/docs", "/redoc"):
        resp = httpx.get(base + path, timeout=10)
        assert resp.status_code == 404 or "cdn." not in resp.text, (path, resp.status_code, resp.text[:300])
    assert "/goal" in httpx.get(base + "/openapi.json", timeout=10).json()["paths"]


@pytest.mark.redis
def test_200_concurrent_goals_are_all_accepted_and_finished_once(service):
    "Issue #22: 200 concurrent POST /goal gave 91 × 503 (client connection cap), 62 accepted goals `failed`, 48 stuck."
    base, r = service
    payloads = [dict(goal=DEVOPS if i % 2 else DOCS3, seed=i, failure_rate=0.1) for i in range(200)]
    resps = asyncio.run(post_many(base, payloads))
    codes = Counter(x.status_code for x in resps)
    assert codes == {202: 200}, (codes, [x.text for x in resps if x.status_code != 202][:3])
    ids = [x.json()["id"] for x in resps]
    pool_size = load_config("quick").workflows.service_pool_size
    clients = r.info("clients")["connected_clients"]  # the service's pool + its startup check + this test's client
    assert clients <= pool_size + 2, (clients, pool_size)
    status = wait_all_terminal(r, ids, timeout_s=60)
    for gid in ids:  # `failed` only from simulated step outcomes, never from a Redis error
        assert_ran_once(r, gid)
    assert Counter(status.values())["done"] > 0
    health = httpx.get(base + "/health", timeout=10).json()
    assert health["running"] == 0 and health["queued"] == 0, health


@pytest.mark.redis
def test_a_killed_instance_goals_are_finished_by_the_other_exactly_once(redis_url, tmp_path):
    "Issue #22: goals of a dead instance stayed `running` until a restart. Now its leases expire and B takes them."
    r = redis.Redis.from_url(redis_url)
    flags = ("--lease-s", "1.5", "--max-running", "8")
    launched = [launch(redis_url, tmp_path, *flags) for _ in range(2)]
    (a, base_a), (b, base_b) = [ready(*x) for x in launched]
    try:
        payloads = [dict(goal=DEVOPS, seed=i, step_delay_s=0.3) for i in range(24)]
        resps = asyncio.run(post_many(base_a, payloads))
        assert [x.status_code for x in resps] == [202] * 24
        ids = [x.json()["id"] for x in resps]
        b_id = httpx.get(base_b + "/health", timeout=5).json().get("instance")

        def held_by_a() -> list[str]:  # running, and not by B
            return [g for g in ids if r.hget(goal_key(g), "status") == b"running"
                    and (r.hget(goal_key(g), "owner") or b"").decode() != b_id]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(r.hlen(steps_key(g)) for g in held_by_a()):
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGKILL)  # mid-goal
        a.wait(timeout=10)
        orphans = held_by_a()
        kept = {g: {k.decode(): json.loads(v) for k, v in r.hgetall(steps_key(g)).items()} for g in orphans}
        assert orphans, "the kill came after A finished its goals: nothing tested"
        status = wait_all_terminal(r, ids, timeout_s=60)  # no restart: B alone must finish everything
        for gid in ids:
            assert_ran_once(r, gid)
        # each orphan was taken over by B, keeping what A had recorded (not re-run). On a starved machine B's own
        # 1.5 s lease can lapse too and B re-claims its goal (runs 3): still every step once, none of A's re-run.
        for gid in orphans:
            assert int(r.hget(goal_key(gid), "runs")) >= 2 and r.hget(goal_key(gid), "owner").decode() == b_id
            after = {k.decode(): json.loads(v) for k, v in r.hgetall(steps_key(gid)).items()}
            assert all(after[k] == rec and rec["run"] == 1 for k, rec in kept[gid].items())
            assert all(rec["run"] >= 2 for k, rec in after.items() if k not in kept[gid])
        assert sum(len(v) for v in kept.values()) > 0
        assert Counter(status.values())["done"] > 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                stop(p)


@pytest.mark.redis
def test_a_paused_instance_loses_its_goals_and_its_late_writes_are_refused(redis_url, tmp_path):
    "A paused worker (SIGSTOP) outlives its leases: B takes its goals; when A wakes, its stale writes are refused."
    r = redis.Redis.from_url(redis_url)
    flags = ("--lease-s", "1.5", "--max-running", "8")
    launched = [launch(redis_url, tmp_path, *flags) for _ in range(2)]
    (a, base_a), (b, base_b) = [ready(*x) for x in launched]
    try:
        resps = asyncio.run(post_many(base_a, [dict(goal=DEVOPS, seed=i, step_delay_s=0.5) for i in range(16)]))
        ids = [x.json()["id"] for x in resps]
        b_id = httpx.get(base_b + "/health", timeout=5).json().get("instance")

        def owner(g: str) -> str:
            return (r.hget(goal_key(g), "owner") or b"").decode()

        def held_by_a() -> list[str]:  # running, and not by B
            return [g for g in ids if r.hget(goal_key(g), "status") == b"running" and owner(g) != b_id]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(r.hlen(steps_key(g)) for g in held_by_a()):
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGSTOP)  # A freezes mid-goal: no renewals, no writes
        paused = held_by_a()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(owner(g) != b_id for g in paused):
            time.sleep(0.05)
        taken = [g for g in paused if owner(g) == b_id]
        os.kill(a.pid, signal.SIGCONT)  # A wakes up and carries on with runs that are no longer its own
        wait_all_terminal(r, ids, timeout_s=60)
        for gid in ids:
            assert_ran_once(r, gid)
        assert paused and taken == paused, (len(paused), len(taken))
        stats = httpx.get(base_a + "/health", timeout=10).json()["stats"]
        assert stats["discarded"] >= 1, stats  # A's late work was refused by Redis, not recorded
    finally:
        for p in (a, b):
            if p.poll() is None:
                stop(p)


@pytest.mark.redis
def test_two_instances_on_one_redis_never_run_a_goal_twice(redis_url, tmp_path):
    "Issue #22: two instances on one Redis ran the same goal twice (the second resumed the first's running goals)."
    r = redis.Redis.from_url(redis_url)
    a, base_a = start_service(redis_url, tmp_path, "--max-running", "4")
    try:  # 4 slow goals (3 levels × 8 s) on A: still running when B has imported and started
        launched_b = launch(redis_url, tmp_path, "--max-running", "4")  # B imports while A takes its goals
        first = asyncio.run(post_many(base_a, [dict(goal=DEVOPS, seed=i, step_delay_s=8.0) for i in range(4)]))
        b, base_b = ready(*launched_b)
        try:
            running_at_b = sum(r.hget(goal_key(x.json()["id"]), "status") == b"running" for x in first)
            second = asyncio.run(post_many(base_b, [dict(goal=DOCS3, seed=i, step_delay_s=0.2) for i in range(12)]))
            ids = [x.json()["id"] for x in first + second]
            wait_all_terminal(r, ids, timeout_s=90)
        finally:
            stop(b)
    finally:
        stop(a)
    assert running_at_b > 0, "A had finished before B started: nothing tested"
    for gid in ids:
        kinds = assert_ran_once(r, gid)
        assert kinds.count("planned") == 1 and "resumed" not in kinds and int(r.hget(goal_key(gid), "runs")) == 1


@pytest.mark.redis
def test_a_redis_blip_loses_no_goal_and_fails_none(tmp_path):
    "Issue #22: after a Redis blip a goal in flight stayed `running` for ever. Now it is retried, re-queued, finished."
    from conftest import start_redis

    rproc, url = start_redis(tmp_path, persist=True)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    r = redis.Redis.from_url(url)
    flags = ("--lease-s", "1.5", "--retries", "2")  # gives up on a call after ~0.3 s: the re-queue path is taken
    proc, base = start_service(url, tmp_path, *flags)
    try:
        assert httpx.get(base + "/health", timeout=10).json()["persistence"] == "append-only file"
        resps = asyncio.run(post_many(base, [dict(goal=DOCS3, seed=i, step_delay_s=0.3) for i in range(16)]))
        assert [x.status_code for x in resps] == [202] * 16
        ids = [x.json()["id"] for x in resps]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(r.hlen(steps_key(g)) for g in ids) < 8:
            time.sleep(0.02)
        rproc.kill()  # the blip: Redis gone for ~2 s mid-run, then back on the same port with its data
        rproc.wait(timeout=10)
        time.sleep(2.0)
        rproc, _ = start_redis(tmp_path, port=port, persist=True)
        r = redis.Redis.from_url(url)
        wait_all_terminal(r, ids, timeout_s=60)
        for gid in ids:
            kinds = assert_ran_once(r, gid)  # no error recorded: a Redis error never ends a goal
        health = httpx.get(base + "/health", timeout=10).json()
        assert health["running"] == 0 and health["active"] == 0, health
    finally:
        stop(proc)
        rproc.kill()
        rproc.wait(timeout=10)


def _raw_post(port: int, head: str, chunks, timeout_s: float = 5.0) -> tuple[str, int]:
    "Send `head` then the body `chunks` over a raw socket; return (first response line, body bytes sent)."
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head.encode())
        sent = 0
        try:
            for c in chunks:
                s.sendall(c)
                sent += len(c)
                s.settimeout(0.01)  # has an answer come already?
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    if s.recv(1, socket.MSG_PEEK):
                        break
                s.settimeout(timeout_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection: it will not read the rest
        s.settimeout(timeout_s)
        try:
            data = s.recv(4096)
        except TimeoutError:
            data = b""
        return data.split(b"\r\n", 1)[0].decode(), sent


@pytest.mark.redis
def test_a_body_over_the_limit_is_refused_without_being_read(service):
    "Issue #22: a 50 MB body was read in full. Now: 413 from the header, or once a streamed body passes the limit."
    base, _ = service
    port, limit = int(base.rsplit(":", 1)[1]), load_config("quick").workflows.service_body_limit
    head = f"POST /goal HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {50 << 20}\r\n\r\n"
    line, sent = _raw_post(port, head, [b"x" * 65536] * 4)  # 256 KiB of a declared 50 MiB, then wait
    assert " 413 " in line, (line, sent)
    head = "POST /goal HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (1024, b"x" * 1024)
    line, sent = _raw_post(port, head, [chunk] * 1024)  # up to 1 MiB, no length announced
    assert " 413 " in line and sent < 4 * limit, (line, sent, limit)
    ok = httpx.post(base + "/goal", json=dict(goal=DEVOPS), timeout=10)  # a normal body still passes
    assert ok.status_code == 202, ok.text


@pytest.mark.redis
def test_an_api_key_guards_the_service_and_is_required_beyond_loopback(redis_url, tmp_path):
    "Issue #22: no authentication. With RAPO_API_KEY set, every path but /health needs it; no key, no public bind."
    env = {k: v for k, v in os.environ.items() if k != "RAPO_API_KEY"}
    cmd = [*SERVICE, "--redis-url", redis_url, "--host", "0.0.0.0", "--port", str(free_port())]
    public = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc, base = start_service(redis_url, tmp_path, env=dict(RAPO_API_KEY="k-123"))
    except BaseException:
        public.kill()
        raise
    try:
        assert httpx.post(base + "/goal", json=dict(goal=DEVOPS), timeout=10).status_code == 401
        assert httpx.get(base + "/openapi.json", timeout=10).status_code == 401
        bad = httpx.post(base + "/goal", json=dict(goal=DEVOPS), headers={"X-API-Key": "k-12"}, timeout=10)
        assert bad.status_code == 401 and "API key" in bad.json()["detail"]
        ok = httpx.post(base + "/goal", json=dict(goal=DEVOPS), headers={"X-API-Key": "k-123"}, timeout=10)
        assert ok.status_code == 202, ok.text
        st = wait_terminal(base, ok.json()["id"], headers={"Authorization": "Bearer k-123"})
        assert st["status"] in ("done", "failed")
    except BaseException:
        public.kill()
        raise
    finally:
        stop(proc)
    try:
        _, err = public.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        public.kill()
        public.wait(10)
        pytest.fail("rapo-service --host 0.0.0.0 without RAPO_API_KEY kept running (it served without a key)")
    assert public.returncode != 0 and "RAPO_API_KEY" in err and "Traceback" not in err, err[-2000:]


@pytest.mark.redis
def test_the_flag_wins_over_a_bad_environment_variable(service):
    "Issue #22: `RAPO_REDIS_URL=… rapo-service --redis-url …` crashed at import (the app was built from the env)."
    base, r = service  # started with RAPO_REDIS_URL=localhost:6379 (malformed) in its environment
    kw = r.connection_pool.connection_kwargs
    health = httpx.get(base + "/health", timeout=10).json()
    assert health["redis"] == f"{kw['host']}:{kw['port']}"
    assert health["persistence"].startswith("no append-only file")  # this Redis does not persist: /health says so


def test_unreachable_redis_names_host_and_port(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        with TestClient(create_app(f"redis://127.0.0.1:{port}/0")):
            pass
    with pytest.raises(ValueError, match="redis_url"):
        create_app("http://127.0.0.1:6379")
    with pytest.raises(SystemExit) as e:  # the console entry: the startup fails with a message, not a traceback
        main(["--redis-url", f"redis://127.0.0.1:{port}/0", "--port", str(free_port())])
    assert e.value.code not in (0, None)
    with pytest.raises(SystemExit, match="redis_url"):
        main(["--redis-url", "localhost:6379"])


def test_the_factory_reads_the_environment_when_called(monkeypatch):
    "`uvicorn --factory rapo_nb.service:app_from_env`: RAPO_REDIS_URL and RAPO_API_KEY are read by the factory only."
    monkeypatch.setenv("RAPO_REDIS_URL", "localhost:6379")
    with pytest.raises(ValueError, match="redis_url"):
        app_from_env()
    monkeypatch.setenv("RAPO_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("RAPO_API_KEY", "k")
    app = app_from_env()
    guard = [m for m in app.user_middleware if m.cls.__name__ == "Guard"]
    assert len(guard) == 1 and guard[0].kwargs["api_key"] == "k"


@pytest.mark.redis
def test_resume_replays_the_same_outcomes(redis_url):
    "Outcome draws depend on (seed, goal, subtask), not on which process runs them: a resumed step draws the same."
    cfg_goal = dict(goal=DEVOPS, failure_rate=0.5, seed=7)
    with TestClient(create_app(redis_url)) as c:
        gid = c.post("/goal", json=cfg_goal).json()["id"]
        t0 = time.monotonic()
        while c.get(f"/goal/{gid}").json()["status"] not in ("done", "failed") and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        first = c.get(f"/goal/{gid}").json()
    r = redis.Redis.from_url(redis_url)
    r.delete(steps_key(gid))
    r.hset(goal_key(gid), mapping=dict(status="running"))
    r.hdel(goal_key(gid), "result")
    r.sadd(ACTIVE, gid)
    with TestClient(create_app(redis_url)) as c:  # startup finds it without a lease and queues it again
        t0 = time.monotonic()
        while c.get(f"/goal/{gid}").json()["status"] not in ("done", "failed") and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        second = c.get(f"/goal/{gid}").json()
    assert second["runs"] == 2

    def outcomes(st):
        return {k: [a["outcome"] for a in v["log"]] for k, v in st["steps"].items()}

    # the executors differ (the second app's bank learned nothing yet) but injected failures are the same draws
    a, b = outcomes(first), outcomes(second)
    common = sorted(set(a) & set(b))
    assert len(common) >= 2  # at least the first level ran both times
    assert [a[k][0] == "crash" for k in common] == [b[k][0] == "crash" for k in common]


@pytest.mark.redis
def test_redis_lost_after_startup_gives_503_naming_it(tmp_path):
    from conftest import start_redis

    rproc, url = start_redis(tmp_path)
    port = url.rsplit(":", 1)[1].split("/")[0]
    try:
        with TestClient(create_app(url, load_config("quick", workflows__service_retries=1))) as c:
            assert c.get("/health").status_code == 200
            rproc.kill()
            rproc.wait(timeout=10)
            for resp in (c.get("/goal/" + "b" * 32), c.post("/goal", json=dict(goal=DEVOPS))):
                assert resp.status_code == 503 and f"127.0.0.1:{port}" in resp.json()["detail"], resp.text
    finally:
        if rproc.poll() is None:
            rproc.kill()
            rproc.wait(timeout=10)
