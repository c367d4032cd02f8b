"""The goal service under load (issue #22): N concurrent `POST /goal` against `rapo-service` on a real redis-server.

Starts its own redis-server and service process(es) on free 127.0.0.1 ports (loopback only), posts all goals at once
with httpx.AsyncClient (one connection each), follows every goal on the `rapo:goals` pub/sub channel until it is done or
failed (bounded by --timeout), and stops everything by pid. Executors are simulated (rapo_nb.workflows).
Rows: 1 instance, then 2 instances on the same Redis (the goals posted round-robin to both).
  accepted   — 202 answers; lost — accepted goals not finished (done/failed) by the deadline
  duplicated — goals with a subtask recorded twice or two terminal events; errors — goals carrying an error
Usage: python benchmarks/bench_service.py [--goals 500] [--instances 1,2] [--step-delay 0] [--timeout 180]
                                         [--service-flags "--max-running 64 --pool-size 32"]
Latencies are wall-clock on this machine; they are noisy on a shared machine.
"""
from __future__ import annotations
import argparse, asyncio, json, os, shutil, socket, subprocess, sys, tempfile, threading, time
from collections import Counter
from pathlib import Path
import httpx
import numpy as np
import redis
from _loopback_redis import free_port, start_redis  # benchmarks/: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
GOALS = (
    "Deploy the api and web services to staging: build them, run the tests, and roll back on failure.",
    "Process the invoice, contract and receipt received this week: classify, extract and validate them.",
)


def start_services(url: str, n: int, tmpdir: str, flags: tuple = ()) -> list[tuple[subprocess.Popen, str]]:
    "n `rapo-service` processes on free loopback ports, started together; returns [(process, base URL)]."
    out = []
    for _ in range(n):
        port = free_port()
        cmd = [sys.executable, "-c", "from rapo_nb.service import main; main()"]
        cmd += ["--redis-url", url, "--port", str(port), *flags]
        log = open(Path(tmpdir) / f"service_{port}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, RAPO_DEVICE="cpu"), stdout=log, stderr=log)
        out.append((proc, f"http://127.0.0.1:{port}"))
    for proc, base in out:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"service on {base} did not start")
            time.sleep(0.1)
    return out


def follow(url: str, finished: dict, stop: threading.Event) -> None:
    "Record the server time of each goal's terminal event (pub/sub on rapo:goals)."
    sub = redis.Redis.from_url(url).pubsub()
    sub.subscribe("rapo:goals")
    while not stop.is_set():
        m = sub.get_message(timeout=0.2)
        if m and m["type"] == "message":
            e = json.loads(m["data"])
            if e["event"] in ("done", "failed"):
                finished.setdefault(e["id"], e["t"])
    sub.close()


async def post_all(bases: list[str], n: int, step_delay: float) -> list[tuple[float, float, int, str | None]]:
    "(wall time sent, POST seconds, status code, goal id) for n goals posted at once, round-robin over the bases."
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as c:

        async def one(i: int):
            t0, p0 = time.time(), time.perf_counter()
            body = dict(goal=GOALS[i % 2], seed=i, failure_rate=0.1, step_delay_s=step_delay)
            try:
                r = await c.post(bases[i % len(bases)] + "/goal", json=body)
                code, gid = r.status_code, (r.json().get("id") if r.status_code == 202 else None)
            except httpx.HTTPError:
                code, gid = -1, None
            return t0, time.perf_counter() - p0, code, gid

        return await asyncio.gather(*(one(i) for i in range(n)))


def audit(r: redis.Redis, gid: str) -> tuple[str, bool, bool]:
    "(status, duplicated, error recorded) of one goal, from its event log and hash in Redis."
    kinds = Counter()
    steps = Counter()
    for x in r.lrange(f"rapo:goal:{gid}:events", 0, -1):
        e = json.loads(x)
        kinds[e["event"]] += 1
        if e["event"] == "step":
            steps[e["subtask"]] += 1
    dup = any(v > 1 for v in steps.values()) or kinds["done"] + kinds["failed"] > 1
    status = (r.hget(f"rapo:goal:{gid}", "status") or b"<missing>").decode()
    return status, dup, r.hget(f"rapo:goal:{gid}", "error") is not None


def run(n_goals: int, n_instances: int, step_delay: float, timeout_s: float, flags: tuple = ()) -> dict:
    tmp = tempfile.mkdtemp()
    rproc, url = start_redis(tmp)
    services = []
    try:
        services = start_services(url, n_instances, tmp, flags)
        finished, stop = {}, threading.Event()
        th = threading.Thread(target=follow, args=(url, finished, stop), daemon=True)
        th.start()
        time.sleep(0.3)
        t_start = time.perf_counter()
        posts = asyncio.run(post_all([b for _, b in services], n_goals, step_delay))
        accepted = {gid: t0 for t0, _, code, gid in posts if code == 202}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not set(accepted) <= set(finished):
            time.sleep(0.1)
        wall = time.perf_counter() - t_start
        stop.set()
        th.join(5)
        r = redis.Redis.from_url(url)
        audits = {gid: audit(r, gid) for gid in accepted}
        lost = sum(st not in ("done", "failed") for st, _, _ in audits.values())
        post_s = np.array([dt for _, dt, _, _ in posts])
        done_s = np.array([finished[g] - t0 for g, t0 in accepted.items() if g in finished])
        codes = Counter(code for _, _, code, _ in posts)
        return {
            "instances": n_instances,
            "goals": n_goals,
            "accepted": len(accepted),
            "refused": n_goals - len(accepted),
            "lost": lost,
            "duplicated": sum(d for _, d, _ in audits.values()),
            "errors": sum(e for _, _, e in audits.values()),
            "done": sum(st == "done" for st, _, _ in audits.values()),
            "failed (simulated)": sum(st == "failed" for st, _, _ in audits.values()),
            "POST p50 ms": 1000 * float(np.median(post_s)),
            "POST p99 ms": 1000 * float(np.quantile(post_s, 0.99)),
            "goal p50 s": float(np.median(done_s)) if len(done_s) else float("nan"),
            "goal p99 s": float(np.quantile(done_s, 0.99)) if len(done_s) else float("nan"),
            "wall s": wall,
            "codes": dict(codes),
        }
    finally:
        for p, _ in services:
            p.kill()
            p.wait(10)
        rproc.kill()
        rproc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--goals", type=int, default=500)
    ap.add_argument("--instances", default="1,2", help="comma-separated instance counts, one row each")
    ap.add_argument("--step-delay", type=float, default=0.0, help="real seconds per subtask (0: CPU-bound)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds allowed after the last POST")
    ap.add_argument("--service-flags", default="", help="extra rapo-service flags, e.g. '--max-running 32'")
    a = ap.parse_args()
    flags = tuple(a.service_flags.split())
    rows = [run(a.goals, int(k), a.step_delay, a.timeout, flags) for k in a.instances.split(",")]
    cols = [c for c in rows[0] if c != "codes"]
    print(f"goal service, {a.goals} concurrent POST /goal, step delay {a.step_delay} s, loopback, simulated executors")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    for row in rows:
        print(f"instances={row['instances']}: HTTP codes {row['codes']}")
    ok = all(row["lost"] == 0 and row["refused"] == 0 and row["duplicated"] == 0 for row in rows)
    print(f"target: all {a.goals} accepted, 0 accepted goals lost, 0 run twice — {'met' if ok else 'not met'}")


if __name__ == "__main__":
    main()
