"""The goal service (seed 004) over real HTTP: uvicorn in a subprocess on a free loopback port, a real redis-server."""
import json, os, socket, subprocess, sys, time
from pathlib import Path
import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from rapo_nb.store import StoreUnavailable
from rapo_nb.service import ACTIVE, CHANNEL_ALL, create_app, events_key, goal_key, steps_key

ROOT = Path(__file__).resolve().parents[1]
DEVOPS = "Deploy the api and web services to staging: build them, run the tests, and roll back on failure."
DOCS3 = "Process the invoice, contract and receipt received this week: classify, extract and validate them."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def start_service(redis_url: str, tmp_path: Path):
    "uvicorn rapo_nb.service:app on a free port; returns (process, base URL, log path) once /health answers."
    port = free_port()
    log = tmp_path / f"uvicorn_{port}.log"
    env = dict(os.environ, RAPO_REDIS_URL=redis_url, RAPO_DEVICE="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "rapo_nb.service:app", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None: break
        try:
            if httpx.get(base + "/health", timeout=1.0).status_code == 200: return proc, base, log
        except httpx.HTTPError: pass
        time.sleep(0.1)
    proc.kill(); proc.wait(10)
    pytest.fail(f"the service did not start on {base}; log:\n{log.read_text()[-3000:]}")


def stop(proc) -> None:
    proc.kill(); proc.wait(timeout=10)


def wait_terminal(base: str, gid: str, timeout_s: float = 30.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        st = httpx.get(f"{base}/goal/{gid}", timeout=5).json()
        if st["status"] in ("done", "failed"): return st
        time.sleep(0.05)
    raise AssertionError(f"goal {gid} not finished after {timeout_s}s: {st}")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    "One redis-server and one uvicorn process shared by the tests that do not restart anything (each start costs an import)."
    from conftest import start_redis
    tmp = tmp_path_factory.mktemp("service")
    rproc, url = start_redis(tmp)
    try:
        proc, base, _ = start_service(url, tmp)
        yield base, redis.Redis.from_url(url)
        stop(proc)
    finally:
        rproc.kill(); rproc.wait(timeout=10)


@pytest.mark.redis
def test_goal_runs_with_results_in_redis_and_progress_on_pubsub(service):
    base, r = service
    sub = r.pubsub(); sub.subscribe(CHANNEL_ALL); sub.get_message(timeout=2)
    resp = httpx.post(base + "/goal", json=dict(goal=DEVOPS, failure_rate=0.2, seed=3), timeout=10)
    assert resp.status_code == 202, resp.text
    body = resp.json(); gid = body["id"]
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
            if e["id"] == gid: events.append(e)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "planned" and kinds[-1] == st["status"]
    assert sorted(e["subtask"] for e in events if e["event"] == "step") == sorted(stored)
    assert [json.loads(x)["event"] for x in r.lrange(events_key(gid), 0, -1)] == kinds   # the event log
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
@pytest.mark.slow
def test_a_goal_survives_a_service_restart(redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    proc, base, _ = start_service(redis_url, tmp_path)
    try:
        gid = httpx.post(base + "/goal", json=dict(goal=DOCS3, seed=1, step_delay_s=0.5), timeout=10).json()["id"]
        deadline = time.monotonic() + 20
        while r.hlen(steps_key(gid)) < 3 and time.monotonic() < deadline: time.sleep(0.02)
    finally:
        stop(proc)                                            # killed mid-goal (SIGKILL: no clean shutdown)
    before = {k.decode(): json.loads(v) for k, v in r.hgetall(steps_key(gid)).items()}
    assert 3 <= len(before) < 9 and r.hget(goal_key(gid), "status").decode() == "running" and r.sismember(ACTIVE, gid)
    proc, base, _ = start_service(redis_url, tmp_path)       # a new process, same Redis
    try:
        st = wait_terminal(base, gid)
    finally:
        stop(proc)
    assert st["runs"] == 2 and (st["n_done"] == 9 or st["status"] == "failed")
    for k, rec in before.items():                             # steps finished before the kill were kept, not re-run
        assert st["steps"][k] == rec and rec["run"] == 1
    assert all(rec["run"] == 2 for k, rec in st["steps"].items() if k not in before)
    assert not r.sismember(ACTIVE, gid)


@pytest.mark.redis
def test_resume_replays_the_same_outcomes(redis_url):
    "Outcome draws depend on (seed, goal, subtask), not on which process runs them: a resumed step draws what it would have."
    cfg_goal = dict(goal=DEVOPS, failure_rate=0.5, seed=7)
    with TestClient(create_app(redis_url)) as c:
        gid = c.post("/goal", json=cfg_goal).json()["id"]
        t0 = time.monotonic()
        while c.get(f"/goal/{gid}").json()["status"] not in ("done", "failed") and time.monotonic() - t0 < 20: time.sleep(0.05)
        first = c.get(f"/goal/{gid}").json()
    r = redis.Redis.from_url(redis_url)
    r.delete(steps_key(gid)); r.hset(goal_key(gid), mapping=dict(status="running")); r.hdel(goal_key(gid), "result"); r.sadd(ACTIVE, gid)
    with TestClient(create_app(redis_url)) as c:              # startup resumes it from scratch
        t0 = time.monotonic()
        while c.get(f"/goal/{gid}").json()["status"] not in ("done", "failed") and time.monotonic() - t0 < 20: time.sleep(0.05)
        second = c.get(f"/goal/{gid}").json()
    assert second["runs"] == 2
    outcomes = lambda st: {k: [a["outcome"] for a in v["log"]] for k, v in st["steps"].items()}
    # the executors differ (the second app's bank learned nothing yet) but injected failures are the same draws
    a, b = outcomes(first), outcomes(second)
    common = sorted(set(a) & set(b))
    assert len(common) >= 2                                    # at least the first level ran both times
    assert [a[k][0] == "crash" for k in common] == [b[k][0] == "crash" for k in common]


def test_unreachable_redis_names_host_and_port(tmp_path):
    port = free_port()                                        # nothing listens there
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        with TestClient(create_app(f"redis://127.0.0.1:{port}/0")): pass
    with pytest.raises(ValueError, match="redis_url"):
        create_app("http://127.0.0.1:6379")
    env = dict(os.environ, RAPO_REDIS_URL=f"redis://127.0.0.1:{port}/0", RAPO_DEVICE="cpu")
    out = subprocess.run([sys.executable, "-m", "uvicorn", "rapo_nb.service:app", "--host", "127.0.0.1", "--port", str(free_port())],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"127.0.0.1:{port}" in out.stdout + out.stderr


@pytest.mark.redis
def test_redis_lost_after_startup_gives_503_naming_it(tmp_path):
    from conftest import start_redis
    rproc, url = start_redis(tmp_path)
    port = url.rsplit(":", 1)[1].split("/")[0]
    try:
        with TestClient(create_app(url)) as c:
            assert c.get("/health").status_code == 200
            rproc.kill(); rproc.wait(timeout=10)
            for resp in (c.get("/goal/" + "b" * 32), c.post("/goal", json=dict(goal=DEVOPS))):
                assert resp.status_code == 503 and f"127.0.0.1:{port}" in resp.json()["detail"], resp.text
    finally:
        if rproc.poll() is None: rproc.kill(); rproc.wait(timeout=10)
