"""The README: generated from index.ipynb, exactly two commands, and .ci/run calls the test one."""
import re
from pathlib import Path
from rapo_nb.reproduce import index_to_markdown

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [l.split("#")[0].strip() for b in blocks for l in b.splitlines() if l.strip() and not l.strip().startswith("#")]


def test_readme_in_sync_with_index():
    assert (ROOT / "README.md").read_text() == index_to_markdown(ROOT / "nbs" / "index.ipynb"), "run rapo-readme"


def test_readme_has_exactly_two_commands():
    assert _commands((ROOT / "README.md").read_text()) == ["make reproduce", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\s*$", ci, flags=re.M)
    mk = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in mk and "scripts/test.sh" in mk and "rapo-reproduce --profile" in mk
    t = (ROOT / "scripts" / "test.sh").read_text()
    for step in ("nbdev-export", "nbdev-clean", "nbdev-test", "pytest"): assert step in t


def test_torch_bounded_not_pinned():
    deps = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+,<\d+"', deps)
