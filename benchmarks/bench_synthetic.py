"""Benchmark: time to generate the §5.1 synthetic benchmark on one core (target: 1,000 conversations ≤ 5 s).

Usage: python benchmarks/bench_synthetic.py [--sizes 100,1000] [--repeats 3]
Prints a table (median of `repeats` runs per size). Pin to one core with `taskset -c 0` for the issue's setting.
"""
from __future__ import annotations
import argparse, os, statistics, time
import pandas as pd
from rapo_nb.config import load_config
from rapo_nb.synthetic import generate_conversations, jsonl_sha256

TARGET_S_PER_1000 = 5.0  # issue #5: 1,000 conversations in ≤ 5 s on one core


def run(sizes=(100, 1000), repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    "Median wall time of generate_conversations(n) for each n in `sizes`."
    cfg = load_config("full")
    rows = []
    for n in sizes:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter(); convs = generate_conversations(n, seed, cfg); times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        turns = sum(c.n_turns for c in convs)
        rows.append(dict(conversations=n, turns=turns, seconds=med, conv_per_s=n / med,
                         projected_s_per_1000=med * 1000 / n, within_target=med * 1000 / n <= TARGET_S_PER_1000,
                         sha256=jsonl_sha256(convs)[:12]))
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000"); ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try: cores = len(os.sched_getaffinity(0))
    except AttributeError: cores = os.cpu_count()
    df = run(tuple(int(s) for s in a.sizes.split(",")), a.repeats, a.seed)
    print(f"synthetic generation (cores available to this process: {cores}; target {TARGET_S_PER_1000} s per 1,000)")
    print(df.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
