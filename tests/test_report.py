"""REPORT.md (#19): verdicts counted per kind on two lines, results and conformance in separate tables, bad tables
rejected naming the file and the claim, and the documented default for tables that predate the `kind` column."""
from __future__ import annotations

import pandas as pd
import pytest

from rapo_nb.config import claim_row, claims_frame
from rapo_nb.report import build_report, collect_claims, count_lines


def _tables(d):
    claims_frame([
        claim_row("p", "§3.2", 512, 512, kind="conformance", ok=True),
        claim_row("eta", "§3.4", 0.1, 0.2, kind="conformance", ok=False),
        claim_row("success", "§5.3", 0.87, 0.35, kind="result", ok=False),
        claim_row("beats random", "§3.4", "better", "0.6 vs 0.5", kind="result", ok=True),
        claim_row("saving", "§4.5", "40%", "36%", kind="result", ok=True, comparable=False),
        claim_row("CV", "§6", 2.3, "—", kind="result", ok=None),
    ]).to_csv(d / "claims_01_x.csv", index=False)


def test_report_counts_results_and_conformance_apart(tmp_path):
    _tables(tmp_path)
    text = build_report("quick", tmp_path)
    verdicts = text.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    assert "**Results** (4 claims): reproduced: 1 · differs: 1 · not comparable: 1 · not measured: 1" in verdicts
    assert "**Conformance** (2 claims): implemented as specified: 1 · differs: 1" in verdicts
    res = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    conf = text.split("## Conformance", 1)[1].split("\n## ", 1)[0]
    assert "success" in res and "| p " not in res
    assert "| p " in conf and "success" not in conf


def test_a_reproduced_conformance_row_or_config_result_is_rejected_naming_file_and_claim(tmp_path):
    _tables(tmp_path)
    df = pd.read_csv(tmp_path / "claims_01_x.csv", dtype=str, keep_default_na=False)
    df.loc[df.claim == "eta", "verdict"] = "reproduced"
    df.to_csv(tmp_path / "claims_01_x.csv", index=False)
    with pytest.raises(ValueError, match="claims_01_x.csv: claim 'eta': a conformance row cannot be 'reproduced'"):
        collect_claims(tmp_path)
    df.loc[df.claim == "eta", "verdict"] = "differs"
    df.loc[df.claim == "success", "paper_source"] = "config"
    df.to_csv(tmp_path / "claims_01_x.csv", index=False)
    with pytest.raises(ValueError, match="claim 'success': its paper value is read from our config"):
        collect_claims(tmp_path)


def test_tables_without_kind_get_the_documented_default_and_are_named(tmp_path):
    _tables(tmp_path)
    old = pd.read_csv(tmp_path / "claims_01_x.csv").drop(columns=["kind", "paper_source"])
    old.to_csv(tmp_path / "claims_02_old.csv", index=False)
    got = collect_claims(tmp_path)
    assert got.attrs["undeclared"] == ["claims_02_old.csv"]
    o = got[got.notebook == "02_old"].set_index("claim")
    assert o.loc["p", "kind"] == "conformance" and o.loc["success", "kind"] == "result"
    assert (o.paper_source == "paper").all()
    assert "Tables that declare no kind (kind inferred from the verdict): claims_02_old.csv" in build_report(
        "quick", tmp_path
    )


def test_count_lines_of_no_claims():
    lines = count_lines(pd.DataFrame(columns=["verdict", "kind"]))
    assert lines[0].startswith("**Results** (0 claims)") and lines[1].startswith("**Conformance** (0 claims)")


def test_readme_counts_line_reads_both_kinds_from_the_report(tmp_path):
    "index.ipynb's show_verdicts (README's counts) takes the results line and the conformance line of REPORT.md."
    import json
    from pathlib import Path

    from IPython.display import Markdown

    root = Path(__file__).resolve().parents[1]
    cells = json.loads((root / "nbs" / "index.ipynb").read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if "def show_verdicts" in "".join(c["source"]))
    (tmp_path / "figures").mkdir()
    _tables(tmp_path / "figures")
    (tmp_path / "figures" / "REPORT.md").write_text(build_report("quick", tmp_path / "figures"))
    ns = {"Markdown": Markdown, "project_root": lambda: tmp_path}
    exec(src, ns)
    text = ns["show_verdicts"]().data
    assert "**Results** (4 claims): reproduced: 1" in text and "**Conformance** (2 claims): implemented" in text
