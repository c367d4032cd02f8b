#!/usr/bin/env python
"""Scaling benchmark (issue 9; paper §4.5, §5.4): Table 2 and past it, the memory law, communication per tick,
consensus share of the tick, the §4.5 memory optimisations and the project's goals.

A thin command-line wrapper around `rapo_nb.scaling.scaling_tables`, the same functions `nbs/17_scaling.ipynb` calls.
Every agent count is measured in its own fresh child process.

    python benchmarks/bench_scaling.py --profile quick
    python benchmarks/bench_scaling.py --sizes 10,1000,100000 --parts sweep,law,goals
"""
import argparse, sys


def parse_args(argv=None) -> argparse.Namespace:
    from rapo_nb.scaling import SCALING_PARTS
    ap = argparse.ArgumentParser(prog="bench_scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", choices=("quick", "full"), help="config profile (agent counts, repeats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default=None, help="comma-separated agent counts (default: cfg.scaling.agent_counts)")
    ap.add_argument("--repeats", type=int, default=None, help="ticks timed per size (default: cfg.scaling.repeats)")
    ap.add_argument("--parts", default=",".join(SCALING_PARTS), help=f"comma-separated subset of {','.join(SCALING_PARTS)}")
    ap.add_argument("--no-success", action="store_true", help="skip the success-rate runs (run_conversations)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from rapo_nb.scaling import scaling_tables, table_floatfmt
    try:
        sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None
    except ValueError:
        print(f"bench_scaling: --sizes: expected comma-separated integers, got {a.sizes!r}", file=sys.stderr); return 2
    try:
        tables = scaling_tables(a.profile, a.seed, sizes, a.repeats, [p.strip() for p in a.parts.split(",") if p.strip()],
                                success=not a.no_success, progress=True)
    except ValueError as e:
        print(f"bench_scaling: {e}", file=sys.stderr); return 2
    for name, df in tables.items():
        print(f"\n## {name}\n"); print(df.to_markdown(index=False, floatfmt=table_floatfmt(df)))
    return 0


if __name__ == "__main__":  # the guard matters: measurements run in child processes
    sys.exit(main())
