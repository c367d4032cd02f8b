"""A distributed run under faults (#22): every turn answered by `rapo-agent` worker processes over Redis Streams.

8 worker processes (each agent hosted by two of them) on a local redis-server (free 127.0.0.1 port, stopped by pid),
2,000 simulated conversations through `runtime.RedisOrchestrator`, run twice side by side:
  clean     — no faults; its turn table is compared with the in-process run (same seed, same simulated agents)
  faults    — two workers killed (SIGKILL, each while it holds a turn) and the orchestrator killed (SIGKILL) once
              each mid-run; the workers are restarted, the orchestrator resumes from its checkpoint
Counted: turns lost (turn rows missing from the final table), turn rows duplicated, turn ids answered more than once
on the results stream (the workers' exactly-once rule), answers published (more than the turn rows after an
orchestrator kill: the resumed orchestrator re-runs the conversations in flight since its last checkpoint, asking
questions that differ — their earlier answers stay unused, none is used twice), turns/s (turn rows / wall time of the
orchestrator's run, worker start-up excluded). The in-process run (`runtime.Orchestrator`) is timed in the same run.
Usage: python benchmarks/bench_distributed.py [--n-conversations 2000] [--workers 8] [--profile quick]
Simulated agents are simulated; numbers are wall-clock on this (shared, noisy) machine.
"""
from __future__ import annotations
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path
import pandas as pd
from _loopback_redis import free_port, start_redis  # benchmarks/: the script's own folder is on sys.path

HERE = Path(__file__).resolve()
AGENT = [sys.executable, "-c", "import sys; from rapo_nb.workers import agent_main; sys.exit(agent_main(sys.argv[1:]))"]


def orchestrator_child(a) -> int:
    "The orchestrator process: resume from --out/checkpoints if there is one, run, write the tables."
    from rapo_nb.config import load_config
    from rapo_nb.synthetic import generate_conversations
    from rapo_nb.runtime import RedisOrchestrator
    cfg = load_config(a.profile, overrides={"runtime.checkpoint_every": a.checkpoint_every}, seed=a.seed)
    convs = generate_conversations(a.n_conversations, a.seed, cfg)
    out = Path(a.out)
    orch = RedisOrchestrator(cfg, "rapo", a.seed, redis_url=a.redis_url, prefix=a.prefix,
                             checkpoint_dir=out / "checkpoints", wait_s=120)
    start = orch.resume()
    print(f"resumed_from={start} done={len(orch.done_ids)}", file=sys.stderr, flush=True)
    with open(out / "starts.txt", "a") as f:
        f.write(f"{time.time()}\n")  # when this incarnation's run began (the first one's is the run's start)
    turns, conv_df = orch.run(convs)
    (out / "run.json").write_text(json.dumps(dict(end=time.time(), resumed_from=start, done_at_resume=len(orch.done_ids),
                                                  dispatched=orch.pool.dispatched, moved=len(orch.pool.moved))))
    turns.to_csv(out / "turns.csv", index=False)
    conv_df.to_csv(out / "conversations.csv", index=False)
    return 0


class Cluster:
    "Worker processes on one redis-server: worker i hosts the agents a with a % (workers/2) == i % (workers/2)."

    def __init__(self, url: str, prefix: str, n_agents: int, n_workers: int, profile: str, seed: int):
        self.url, self.prefix, self.n, self.k = url, prefix, n_agents, n_workers
        self.half = max(n_workers // 2, 1)
        self.base = ["--redis-url", url, "--prefix", prefix, "--profile", profile, "--seed", str(seed),
                     "--n-agents", str(n_agents), "--heartbeat-ms", "200", "--block-ms", "50"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.agents_of: dict[str, str] = {}
        for i in range(n_workers):
            self.start(f"w{i}", ",".join(str(a) for a in range(n_agents) if a % self.half == i % self.half))

    def start(self, name: str, agents: str) -> None:
        self.agents_of[name] = agents
        self.procs[name] = subprocess.Popen(AGENT + self.base + ["--agent", agents, "--consumer", name],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_holder(self, client, names: set[str]) -> str | None:
        "SIGKILL one of `names` while it holds a pending turn (SIGSTOP first: it cannot answer any more); its name."
        from rapo_nb.workers import GROUP, agent_stream
        for a in range(self.n):
            s = agent_stream(self.prefix, a)
            for p in client.xpending_range(s, GROUP, "-", "+", 10):
                name = p["consumer"].decode()
                if name not in names or self.procs[name].poll() is not None:
                    continue
                os.kill(self.procs[name].pid, signal.SIGSTOP)
                if client.xpending_range(s, GROUP, p["message_id"], p["message_id"], 1, consumername=name):
                    os.kill(self.procs[name].pid, signal.SIGKILL)
                    self.procs[name].wait(timeout=10)
                    return name
                os.kill(self.procs[name].pid, signal.SIGCONT)
        return None

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def run_distributed(a, url: str, prefix: str, faults: bool, tmp: str, expected: int) -> dict:
    "One distributed run (a fresh stream prefix); with `faults`, the kills of the module docstring."
    from rapo_nb.store import connect_redis
    from rapo_nb.workers import RedisDispatcher, results_stream
    client = connect_redis(url)
    n = a.n_agents
    cluster = Cluster(url, prefix, n, a.workers, a.profile, a.seed)
    out = Path(tmp) / prefix
    out.mkdir()
    cmd = [sys.executable, str(HERE), "--child", "--redis-url", url, "--prefix", prefix, "--out", str(out),
           "--n-conversations", str(a.n_conversations), "--profile", a.profile, "--seed", str(a.seed),
           "--checkpoint-every", str(a.checkpoint_every)]
    try:
        d = RedisDispatcher(client, n, prefix=prefix)
        t_up = time.perf_counter()
        while not d.alive().all():
            if time.perf_counter() - t_up > 120:
                raise SystemExit("workers did not start within 120 s")
            time.sleep(0.1)
        t_print = time.perf_counter()
        orch = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        plan = [(0.2, "worker"), (0.45, "orchestrator"), (0.6, "worker")] if faults else []
        events, first = [], {f"w{i}" for i in range(a.workers)}
        while orch.poll() != 0:
            if orch.poll() not in (None, 0) and "orchestrator" not in [e[1] for e in events[-1:]]:
                raise SystemExit(f"the orchestrator process failed (exit {orch.returncode})")
            done = client.xlen(results_stream(prefix)) / expected
            if plan and done >= plan[0][0]:
                what = plan[0][1]
                if what == "orchestrator":
                    os.kill(orch.pid, signal.SIGKILL)
                    orch.wait(timeout=10)
                    orch = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)  # resumes from its checkpoint
                    events.append((round(done, 2), "orchestrator"))
                    plan.pop(0)
                else:
                    name = cluster.kill_holder(client, first - {e[1] for e in events})
                    if name:
                        events.append((round(done, 2), name))
                        cluster.start(name + "b", cluster.agents_of[name])  # a new worker joins for its agents
                        plan.pop(0)
            if a.verbose and time.perf_counter() - t_print > 2:
                t_print = time.perf_counter()
                print(f"[{prefix}] {done:.0%} answered, events {events}", file=sys.stderr, flush=True)
            time.sleep(0.005)
    finally:
        if "orch" in locals() and orch.poll() is None:
            orch.kill()
        cluster.stop()
    run = json.loads((out / "run.json").read_text())
    wall = run["end"] - float((out / "starts.txt").read_text().split()[0])
    turns = pd.read_csv(out / "turns.csv", keep_default_na=False)
    per_id = pd.Series([f[b"task_id"] for _, f in client.xrange(results_stream(prefix))]).value_counts()
    rows = len(turns)
    uniq = len(turns.drop_duplicates(["conv_id", "turn"]))
    return dict(turns=turns, wall_s=wall, rows=rows, lost=expected - uniq, duplicated_rows=rows - uniq,
                answered_twice=int((per_id > 1).sum()), answers=int(per_id.sum()), events=events,
                run=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-conversations", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--profile", default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="orchestrator checkpoint every this many ticks")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return orchestrator_child(a)
    if a.workers < 2 or a.n_conversations < 10:
        p.error("--workers ≥ 2 and --n-conversations ≥ 10")
    from rapo_nb.config import load_config
    from rapo_nb.synthetic import generate_conversations
    from rapo_nb.runtime import Orchestrator
    cfg = load_config(a.profile, overrides={"runtime.checkpoint_every": a.checkpoint_every}, seed=a.seed)
    a.n_agents = cfg.evaluation.n_agents
    convs = generate_conversations(a.n_conversations, a.seed, cfg)
    expected = sum(len(c.turns) for c in convs)
    t0 = time.perf_counter()
    ref, _ = Orchestrator(cfg, "rapo", a.seed).run(convs)
    t_ref = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="bench_distributed_")
    rproc, url = start_redis(tmp)
    try:
        clean = run_distributed(a, url, "clean", False, tmp, expected)
        hurt = run_distributed(a, url, "faults", True, tmp, expected)
    finally:
        rproc.kill()
        rproc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    cols = [c for c in ref.columns if c != "overhead_ms"]
    same = clean["turns"][cols].reset_index(drop=True).equals(ref[cols].reset_index(drop=True).astype(clean["turns"][cols].dtypes))
    rows = [dict(run="in-process (Orchestrator)", faults="none", turn_rows=len(ref), lost=expected - len(ref),
                 duplicated=0, answered_twice="-", answers="-", wall_s=t_ref, same_as_in_process="-")]
    for name, r, f in (("redis, clean", clean, "none"), ("redis, faults", hurt, "; ".join(f"{w} at {x:.0%}" for x, w in hurt["events"]))):
        rows.append(dict(run=name, faults=f, turn_rows=r["rows"], lost=r["lost"], duplicated=r["duplicated_rows"],
                         answered_twice=r["answered_twice"], answers=r["answers"], wall_s=r["wall_s"],
                         same_as_in_process=("yes" if same else "no") if r is clean else "not compared (resumed)"))
    df = pd.DataFrame(rows)
    df["turns_per_s"] = df["turn_rows"] / df["wall_s"]
    print(f"{a.n_conversations} conversations ({expected} turns), {a.workers} rapo-agent workers, {a.n_agents} simulated "
          f"agents (each on {a.workers // max(a.workers // 2, 1)} workers), profile {a.profile}; wall = the "
          f"orchestrator's run, first turn → last (in 'faults': with its kill, restart and resume)")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    ok = hurt["lost"] == 0 and hurt["duplicated_rows"] == 0 and hurt["answered_twice"] == 0 and len(hurt["events"]) == 3
    print(f"0 turns lost, 0 duplicated under two worker kills and an orchestrator kill: {'met' if ok else 'NOT met'}")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
