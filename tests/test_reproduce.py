"""The runner: notebook discovery, a quick run of the notebooks present, and a clear failure."""
import json, subprocess, sys, textwrap
from pathlib import Path
import nbformat
import pytest
from rapo_nb.reproduce import numbered_notebooks, main, reproduce, NotebookFailed
from rapo_nb.config import project_root

ROOT = Path(__file__).resolve().parents[1]


def test_discovers_numbered_notebooks_in_order():
    names = [p.name for p in numbered_notebooks(ROOT / "nbs")]
    assert names[0] == "00_config.ipynb" and names == sorted(names)
    assert "index.ipynb" not in names and "reproduce.ipynb" not in names


def test_parameters_cell_is_tagged_in_every_numbered_notebook():
    for p in numbered_notebooks(ROOT / "nbs"):
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{p.name}: needs exactly one cell tagged 'parameters'"
        assert "profile" in tagged[0].source and "#| export" not in tagged[0].source


def test_quick_run_of_config_notebook(tmp_path):
    m = reproduce("quick", seed=1, out=tmp_path / "runs", only="00", figures=tmp_path / "fig", verbose=False)
    assert [r["status"] for r in m["notebooks"]] == ["ok"]
    assert (tmp_path / "fig" / "config_constants.md").exists()
    executed = nbformat.read(tmp_path / "runs" / "00_config.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "seed = 1" in injected[0].source, "papermill did not inject the parameters"
    assert json.loads((tmp_path / "fig" / "run_quick.json").read_text())["seed"] == 1


def _fake_project(tmp_path: Path, cells: list[str]) -> Path:
    (tmp_path / "pyproject.toml").write_text("[tool.nbdev]\n")
    (tmp_path / "nbs").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('profile = "quick"\nseed = 0\ndevice = "auto"', metadata={"tags": ["parameters"]})]
                                  + [nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, tmp_path / "nbs" / "00_broken.ipynb")
    return tmp_path


def test_failing_notebook_stops_with_name_and_cell(tmp_path, monkeypatch, capsys):
    root = _fake_project(tmp_path, ["x = 1", "raise RuntimeError('boom in cell')"])
    monkeypatch.setenv("RAPO_ROOT", str(root))
    assert main(["--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "00_broken.ipynb" in err and "boom in cell" in err and "cell" in err


def test_bad_profile_names_valid_ones():
    r = subprocess.run([str(Path(sys.executable).parent / "rapo-reproduce"), "--profile", "huge"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "quick" in r.stderr and "full" in r.stderr


@pytest.mark.slow
def test_full_quick_pipeline(tmp_path):
    "Every numbered notebook present runs end to end under the quick profile (as `make reproduce` does)."
    r = subprocess.run([str(Path(sys.executable).parent / "rapo-reproduce"), "--profile", "quick", "--out", str(tmp_path / "runs"),
                        "--figures", str(tmp_path / "fig")], capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n = len(numbered_notebooks(ROOT / "nbs"))
    assert r.stdout.count(" ok (") == n


def test_keep_outputs_copies_outputs_not_code(tmp_path, monkeypatch):
    root = _fake_project(tmp_path, ["print('hello from the run', seed)"])
    src = root / "nbs" / "00_broken.ipynb"
    code_before = [c.source for c in nbformat.read(src, as_version=4).cells]
    monkeypatch.setenv("RAPO_ROOT", str(root))
    assert main(["--out", str(tmp_path / "runs"), "--seed", "7", "--keep-outputs"]) == 0
    nb = nbformat.read(src, as_version=4)
    assert [c.source for c in nb.cells] == code_before, "keep-outputs must not change the code"
    texts = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "hello from the run 7" in texts
