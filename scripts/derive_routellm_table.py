"""Derive rapo_nb/data/routellm_outcomes.csv.gz from the RouteLLM outcome tables (issue #20).

Run once by a maintainer who has the RouteLLM `routellm/evals/` folder (lm-sys/RouteLLM, commit
0b64fdafe049e596a3f5657c219329f24af24198, Apache License 2.0), e.g. the project's shared copy:

    python scripts/derive_routellm_table.py /path/to/routellm/evals

The notebook 15_routellm and `rapo_nb.routellm.load_outcomes` read only the shipped table; users never need the source.
One row per routed prompt:
- benchmark: mmlu | gsm8k | mt_bench
- prompt_id: mmlu/<subject>/<row>, gsm8k/<row>, mt_bench/<question_id>
- subject: the MMLU subject, "gsm8k", or the MT-Bench category
- weak, strong: Mixtral-8x7B-Instruct-v0.1 and gpt-4-1106-preview outcomes: 1/0 correct (MMLU, GSM8K), or the mean
  GPT-4-judge score (1-10) over the question's two turns (MT-Bench, routed once per question as RouteLLM does)
- contaminated: 1 when RouteLLM's contaminated_prompts.jsonl lists the prompt (MT-Bench: either turn)
- n_chars: length of `text`
- text: the prompt (MT-Bench: the first turn, the one RouteLLM routes on)
"""

import gzip
import io
import sys
from pathlib import Path

import pandas as pd

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def contaminated(src: Path, bench: str) -> set:
    "The eval prompts RouteLLM flagged for `bench`."
    return set(pd.read_json(src / bench / "contaminated_prompts.jsonl", lines=True)["eval_prompt"])


def derive(src: Path) -> pd.DataFrame:
    "The compact table (see the module docstring) from RouteLLM's evals folder `src`."
    rows = []
    bad = contaminated(src, "mmlu")
    for subject in (src / "mmlu" / "domains.txt").read_text().split():
        d = pd.read_csv(src / "mmlu" / "responses" / f"mmlu_{subject}.csv")
        for i, r in d.iterrows():
            rows.append(
                ("mmlu", f"mmlu/{subject}/{i}", subject, int(r[WEAK]), int(r[STRONG]), r.prompt in bad, r.prompt)
            )
    bad = contaminated(src, "gsm8k")
    g = pd.read_csv(src / "gsm8k" / "gsm8k_responses.csv")
    for i, r in g.iterrows():
        rows.append(("gsm8k", f"gsm8k/{i}", "gsm8k", int(r[WEAK]), int(r[STRONG]), r.prompt in bad, r.prompt))
    bad = contaminated(src, "mt_bench")
    q = pd.read_json(src / "mt_bench" / "question.jsonl", lines=True)
    j = pd.read_json(src / "mt_bench" / "judgements.jsonl", lines=True)
    score = j.groupby(["question_id", "model"]).score.mean().unstack()
    for _, r in q.iterrows():
        s = score.loc[r.question_id]
        is_bad = r.turns[0] in bad or r.turns[1] in bad
        rows.append(("mt_bench", f"mt_bench/{r.question_id}", r.category, s[WEAK], s[STRONG], is_bad, r.turns[0]))
    df = pd.DataFrame(rows, columns=["benchmark", "prompt_id", "subject", "weak", "strong", "contaminated", "text"])
    df["contaminated"] = df.contaminated.astype(int)
    df.insert(6, "n_chars", df.text.str.len())
    return df


def write(df: pd.DataFrame, out: Path) -> None:
    "Gzipped CSV with a fixed header timestamp, so the same input gives the same bytes."
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    with open(out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode("utf-8"))


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/routellm")
    out = Path(__file__).resolve().parents[1] / "rapo_nb" / "data" / "routellm_outcomes.csv.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = derive(src)
    write(table, out)
    print(table.groupby("benchmark")[["weak", "strong", "contaminated"]].agg(["mean", "sum", "count"]))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
