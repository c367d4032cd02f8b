"""Benchmark one control-loop tick (batched capability update + one consensus step), issue #3.

Prints a table: median tick time at 1,000 and 100,000 agents (small-world graph, degree 16) with the one-pass numba
step (`rapo_nb.fastpaths.fast_step`: register-blocked gather finished in registers, prefetch, streaming stores for
large banks) and with the plain-torch reference step (`rapo_nb.consensus.consensus_step`), the median time of two plain copies of the P bank measured in the same run (into an
existing buffer, timed alternately with the ticks, and P.clone()), the ratios, CPU time, and bytes per agent (state +
CSR edges). The copy and the tick are timed in alternating blocks (`TICK_BLOCK` calls), each block after one untimed
call: torch's OpenMP workers spin for milliseconds after a parallel operation such as the copy, and a tick right
after it would share the cores with them.
Targets from the issue: ≤ 2 ms at 1,000 agents; ≤ 100 ms (the paper's control-loop period, §3.5) and ≤ 3× a copy
at 100,000 agents; ≤ 6 KB per agent. `meets_target` (time) and `meets_copy_target` (ratio to the copy into a
buffer) are computed from the row's own numbers.

`--huge-pages` runs with torch's transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE=1, set before torch is
imported): large tensors are then backed by 2 MB pages where the kernel allows it. That can speed up a plain copy
(it did 12.7 → 7.9 ms in one run here, far less in another) without moving the tick, so the ratio depends on the
machine's page setup; run_all.sh reports both.

    .venv/bin/python benchmarks/bench_tick.py [--sizes 1000,100000] [--degree 16] [--repeats 31] [--threads N] [--device cpu] [--kernels numba,torch] [--huge-pages]

`bench_tick(...)` returns the table as a DataFrame, so a notebook or test can call it at small size.
"""
from __future__ import annotations
import argparse, os
from pathlib import Path
import pandas as pd

TARGETS_MS = {1000: 2.0, 100_000: 100.0}   # issue #3 targets (not paper numbers)
COPY_RATIO_TARGET = 3.0                    # issue #3: a 100,000-agent tick within 3× of a plain copy of P
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_setting() -> str:
    "The kernel's transparent-huge-page mode (the bracketed word) and whether torch asks for huge pages."
    mode = THP_MODE.read_text().split("[")[1].split("]")[0] if THP_MODE.exists() else "n/a"
    return f"{mode}, torch THP alloc {'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'}"


def bench_tick(sizes=(1000, 100_000), degree: int = 16, repeats: int = 31, device: str = "cpu", threads: int | None = None,
               seed: int = 0, kernels=("numba", "torch")) -> pd.DataFrame:
    "Run the tick benchmark and add the issue's targets as columns (NaN / None where the issue sets none)."
    from rapo_nb.fastpaths import tick_benchmark
    df = tick_benchmark(tuple(sizes), degree=degree, repeats=repeats, device=device, seed=seed, profile="full", threads=threads,
                        kernels=tuple(kernels))
    df["target_ms"] = df.n_agents.map(TARGETS_MS)
    df["meets_target"] = (df.tick_ms <= df.target_ms).astype(object).where(df.target_ms.notna(), None)
    big = df.n_agents >= 100_000
    df["meets_copy_target"] = (df.ratio_to_copy <= COPY_RATIO_TARGET).astype(object).where(big, None)
    df["huge_pages"] = thp_setting()
    return df


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--degree", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", default="numba,torch")
    ap.add_argument("--huge-pages", action="store_true", help="set THP_MEM_ALLOC_ENABLE=1 before torch is imported")
    a = ap.parse_args(argv)
    if a.huge_pages:
        import sys
        if "torch" in sys.modules: raise SystemExit("--huge-pages: torch is already imported in this process; run the script on its own")
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    df = bench_tick([int(s) for s in a.sizes.split(",")], a.degree, a.repeats, a.device, a.threads, kernels=a.kernels.split(","))
    print(df.to_markdown(index=False, floatfmt=".3f"))
    return df


if __name__ == "__main__":
    main()
