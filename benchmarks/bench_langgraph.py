#!/usr/bin/env python
"""Per-handoff orchestration overhead of rapo_nb beside LangGraph (issue 9), both driving the same synthetic
conversations with the same instant fake model, so all measured time is orchestration.

A thin command-line wrapper around `rapo_nb.scaling.handoff_overhead_table`, the function `nbs/17_scaling.ipynb`
calls. LangGraph is optional (`pip install rapo_nb[bench]`); without it only rapo_nb is measured, and the script says so.
Then the issue #18 target, computed from the same run: rapo_nb's per-turn overhead ≥ 10× below LangGraph's.

    python benchmarks/bench_langgraph.py --conversations 200
"""
import argparse, sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_langgraph", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", choices=("quick", "full"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conversations", type=int, default=None, help="conversations driven (default: the profile's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default: cfg.scaling.repeats)")
    a = ap.parse_args(argv)
    from rapo_nb.config import load_config
    from rapo_nb.synthetic import generate_conversations
    from rapo_nb.scaling import (handoff_overhead_table, langgraph_available, table_floatfmt, turn_overhead_verdict,
                                 LANGGRAPH_CONVERSATIONS, TURN_OVERHEAD_RATIO_TARGET)
    cfg = load_config(a.profile, seed=a.seed, device="cpu")
    n = a.conversations or LANGGRAPH_CONVERSATIONS[a.profile]
    if n < 1: print("bench_langgraph: --conversations: expected ≥ 1", file=sys.stderr); return 2
    if not langgraph_available(): print("langgraph not installed (pip install rapo_nb[bench]): measuring rapo_nb alone")
    df = handoff_overhead_table(generate_conversations(n, a.seed, cfg), cfg, a.seed, a.repeats or cfg.scaling.repeats,
                                with_runtime=True)
    print(df.to_markdown(index=False, floatfmt=table_floatfmt(df)))
    v = turn_overhead_verdict(df)
    print(f"\nTarget (issue #18, ours): rapo_nb's per-turn overhead ≥ {TURN_OVERHEAD_RATIO_TARGET:g}× below LangGraph's, "
          "measured in this run")
    print(v.to_markdown(index=False, floatfmt=".3g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
