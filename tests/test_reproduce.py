"""The runner: discovery, outputs by profile (a clean clone stays clean), the cache, the dependency graph, failures
(error, dead kernel, timeout) reported by cell id and source index, --keep-going, provenance and the verdict guard.
Tiny scratch projects in tmp dirs stand in for the real notebooks, except where a real one is the point."""

import json, os, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
from rapo_nb.reproduce import numbered_notebooks, main, reproduce, dependency_graph

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "rapo-reproduce")


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


def test_real_notebooks_declare_what_they_read():
    g = dependency_graph(numbered_notebooks(ROOT / "nbs"))
    assert "13_evaluation" in g["14_statistics"] and "12_training" in g["13_evaluation"]
    assert set(g["21_report"]) == set(g) - {"21_report"}, "the report runs last"


def test_quick_run_of_config_notebook(tmp_path):
    r = reproduce("quick", seed=1, out=tmp_path / "runs", only="00", figures=tmp_path / "fig", verbose=False)
    assert r["ran"] == ["00_config"] and not r["failed"]
    assert (tmp_path / "fig" / "config_constants.md").exists()
    executed = nbformat.read(tmp_path / "runs" / "00_config.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "seed = 1" in injected[0].source, "papermill did not inject the parameters"
    m = json.loads((tmp_path / "fig" / "run_quick.json").read_text())
    assert m["seed"] == 1 and m["artifacts"]["figures/config_constants.md"]["notebook"] == "00_config"
    prov = m["provenance"]["00_config"]
    assert prov["parameters"]["seed"] == 1 and len(prov["git"]["commit"]) == 40 and "dirty" in prov["git"]
    assert "torch" in m["package_sets"][prov["packages"]] and prov["seconds"] > 0


@pytest.mark.slow
def test_quick_profile_leaves_a_clone_clean(tmp_path):
    "The issue's new user: clone, `rapo-reproduce --profile quick`, then `git status` must show nothing."
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAPO_FIGURES_DIR", "RAPO_RESULTS_DIR", "RAPO_ROOT")}
    r = subprocess.run(
        [CLI, "--profile", "quick", "--only", "00_config,01_state"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "figures and tables in runs/quick/figures" in r.stdout, r.stdout
    assert (clone / "runs" / "quick" / "figures" / "config_constants.md").exists()
    st = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True, text=True
    )
    assert st.stdout == "", f"the quick profile dirtied the clone:\n{st.stdout}"
    assert "Kernel is running over TCP" not in r.stderr + r.stdout


# ---- tiny scratch projects -------------------------------------------------------------------------------------

WRITE = "from rapo_nb.config import figures_dir, results_dir\n"


def _nb(root: Path, name: str, cells: list[str], reads: tuple[str, ...] = ()) -> Path:
    "Write nbs/<name>.ipynb: a first cell tagged with `reads:`, the parameters cell, then `cells`."
    first = nbformat.v4.new_code_cell("# first cell", metadata={"tags": [f"reads:{r}" for r in reads]})
    params = nbformat.v4.new_code_cell(
        'profile = "quick"\nseed = 0\ndevice = "auto"', metadata={"tags": ["parameters"]}
    )
    nb = nbformat.v4.new_notebook(cells=[first, params] + [nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    p = root / "nbs" / f"{name}.ipynb"
    nbformat.write(nb, p)
    return p


@pytest.fixture
def project(tmp_path, monkeypatch):
    "An empty project (pyproject with [tool.nbdev], nbs/) used as the runner's root."
    root = tmp_path / "proj"
    (root / "nbs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[tool.nbdev]\n")
    monkeypatch.setenv("RAPO_ROOT", str(root))
    monkeypatch.delenv("RAPO_FIGURES_DIR")
    monkeypatch.delenv("RAPO_RESULTS_DIR")
    return root


def _run(*args) -> int:
    return main(["--jobs", "2", *args])


def test_failure_names_cell_id_source_index_and_keeps_targets(project, capsys):
    _nb(
        project,
        "00_broken",
        [WRITE + "(figures_dir() / 'a.txt').write_text('new')", "x = 1", "raise RuntimeError('boom in cell')"],
    )
    fig = project / "runs" / "quick" / "figures"
    fig.mkdir(parents=True)
    (fig / "a.txt").write_text("old")
    assert _run() == 1
    out = capsys.readouterr()
    src = nbformat.read(project / "nbs" / "00_broken.ipynb", as_version=4)
    cid = src.cells[4].id
    assert f"00_broken: failed in cell {cid} (index 4 in nbs/00_broken.ipynb): RuntimeError: boom in cell" in out.err
    assert "executed copy:" in out.err and "Traceback" not in out.err + out.out
    assert (fig / "a.txt").read_text() == "old", "a failed notebook must not write over the targets"
    m = json.loads((fig / "run_quick.json").read_text())
    assert m["failures"]["00_broken"]["cell_id"] == cid and m["notebooks"][0]["status"] == "failed"


def test_dead_kernel_is_a_named_failure(project, capsys):
    _nb(project, "00_dies", ["x = 1", "import os\nos._exit(3)", "y = 2"])
    assert _run() == 1
    err = capsys.readouterr().err
    cid = nbformat.read(project / "nbs" / "00_dies.ipynb", as_version=4).cells[3].id
    assert f"00_dies: the kernel died in cell {cid} (index 3 in nbs/00_dies.ipynb): DeadKernelError" in err, err
    m = json.loads((project / "runs" / "quick" / "figures" / "run_quick.json").read_text())
    assert m["failures"]["00_dies"]["kind"] == "dead kernel"


def test_cell_timeout_is_a_named_failure(project, capsys):
    _nb(project, "00_slow", ["x = 1", "import time\ntime.sleep(60)"])
    assert _run("--timeout", "3") == 1
    err = capsys.readouterr().err
    cid = nbformat.read(project / "nbs" / "00_slow.ipynb", as_version=4).cells[3].id
    assert f"00_slow: timed out in cell {cid} (index 3 in nbs/00_slow.ipynb)" in err and "--timeout 3" in err, err
    m = json.loads((project / "runs" / "quick" / "figures" / "run_quick.json").read_text())
    assert m["failures"]["00_slow"]["kind"] == "timeout"


def test_keep_going_runs_the_independent_notebooks(project, capsys):
    _nb(project, "00_bad", ["raise ValueError('no')"])
    _nb(project, "01_needs_bad", ["x = 1"], reads=("00_bad",))
    _nb(project, "02_alone", [WRITE + "(figures_dir() / 'alone.txt').write_text('ok')"])
    assert main(["--jobs", "1"]) == 1  # longest chain first: 00_bad fails and nothing new starts
    assert not (project / "runs" / "quick" / "figures" / "alone.txt").exists()
    assert main(["--jobs", "1", "--keep-going"]) == 1
    out = capsys.readouterr().out
    assert (project / "runs" / "quick" / "figures" / "alone.txt").read_text() == "ok"
    assert "blocked 01_needs_bad: needs 00_bad" in out


def test_cache_skips_up_to_date_and_reruns_what_changed(project, capsys):
    _nb(project, "00_a", [WRITE + "(results_dir() / 'a.csv').write_text(f'seed,{seed}')"])
    _nb(
        project,
        "01_b",
        [WRITE + "(figures_dir() / 'b.txt').write_text((results_dir() / 'a.csv').read_text())"],
        reads=("00",),
    )
    _nb(project, "02_c", [WRITE + "(figures_dir() / 'c.txt').write_text('c')"])
    run = project / "runs" / "quick"
    assert _run() == 0
    assert (run / "figures" / "b.txt").read_text() == "seed,0", "01_b reads what 00_a wrote (its scratch was seeded)"
    capsys.readouterr()
    assert _run() == 0
    assert "0 ran, 3 up to date" in capsys.readouterr().out
    # an edit to 02_c re-runs only 02_c
    _nb(project, "02_c", [WRITE + "(figures_dir() / 'c.txt').write_text('c2')"])
    assert _run() == 0
    out = capsys.readouterr().out
    assert "ran 02_c" in out and "1 ran, 2 up to date" in out
    # new parameters: 00_a writes something else, so 01_b, which reads it, re-runs too
    assert _run("--seed", "1") == 0
    assert (run / "figures" / "b.txt").read_text() == "seed,1"
    capsys.readouterr()
    assert main(["--status", "--seed", "1"]) == 0 and capsys.readouterr().out.count("up to date") == 3
    assert main(["--status"]) == 0
    st = capsys.readouterr().out
    assert "00_a" in st and "parameters changed: seed 1 -> 0" in st and "after 00_a (stale)" in st
    # a corrupt entry, and a changed artifact, both mean re-run
    (run / ".cache" / "02_c.json").write_text("{not json")
    (run / "figures" / "b.txt").write_text("edited by hand")
    assert _run("--seed", "1") == 0
    out = capsys.readouterr().out
    assert "ran 02_c" in out and "corrupt cache entry" in out and "ran 01_b" in out and "b.txt changed" in out
    # --only runs the chosen notebook and the stale ones it reads; --force re-runs even when up to date
    assert _run("--only", "01_b") == 0
    out = capsys.readouterr().out
    assert "ran 00_a" in out and "ran 01_b" in out and "02_c" not in out
    assert _run("--only", "02", "--force") == 0
    assert "ran 02_c" in capsys.readouterr().out


def test_outputs_by_profile_full_writes_figures(project):
    _nb(project, "00_a", [WRITE + "(figures_dir() / 'a.txt').write_text(profile)"])
    (project / "runs").mkdir()
    assert _run("--profile", "full") == 0
    assert (project / "figures" / "a.txt").read_text() == "full"
    assert _run() == 0
    assert (project / "figures" / "a.txt").read_text() == "full", "the quick profile never writes figures/"
    assert (project / "runs" / "quick" / "figures" / "a.txt").read_text() == "quick"


def test_verdict_guard_lists_moved_claims(project, capsys):
    claims = "claim,section,paper,ours,verdict,note\nspeed,§5,1,{v},{v},\n"
    _nb(project, "00_a", [WRITE + f"(figures_dir() / 'claims_00_a.csv').write_text({claims!r}.format(v='reproduced'))"])
    assert _run("--write-verdicts") == 0
    snap = project / "tests" / "data" / "verdicts_quick.json"
    assert json.loads(snap.read_text()) == {"00_a: speed": "reproduced"}
    assert _run("--check-verdicts") == 0
    snap.write_text(json.dumps({"00_a: speed": "differs", "00_a: gone": "reproduced"}))
    capsys.readouterr()
    assert _run("--check-verdicts") == 1
    out = capsys.readouterr().out
    assert "moved       00_a: speed: differs -> reproduced" in out and "gone claim  00_a: gone" in out
    # a load-dependent claim is listed with the verdicts it may take; --write-verdicts keeps the list
    snap.write_text(json.dumps({"00_a: speed": ["differs", "reproduced"]}))
    assert _run("--check-verdicts") == 0
    assert _run("--write-verdicts") == 0 and json.loads(snap.read_text()) == {"00_a: speed": ["differs", "reproduced"]}


def test_bad_profile_names_valid_ones():
    r = subprocess.run([CLI, "--profile", "huge"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "quick" in r.stderr and "full" in r.stderr


def test_keep_outputs_copies_outputs_not_code(project):
    src = _nb(project, "00_hello", ["print('hello from the run', seed)"])
    code_before = [c.source for c in nbformat.read(src, as_version=4).cells]
    assert main(["--seed", "7", "--keep-outputs"]) == 0
    nb = nbformat.read(src, as_version=4)
    assert [c.source for c in nb.cells] == code_before, "keep-outputs must not change the code"
    texts = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "hello from the run 7" in texts


def test_independent_notebooks_overlap_and_readers_wait(project):
    "With --jobs 2 two independent notebooks run at the same time; a notebook that reads one starts after it ended."
    stamp = (
        WRITE
        + "import time\nt0 = time.time()\ntime.sleep(4)\n(figures_dir() / '{n}.txt').write_text(f'{{t0}} {{time.time()}}')"
    )
    _nb(project, "00_a", [stamp.format(n="a")])
    _nb(project, "01_b", [stamp.format(n="b")])
    _nb(project, "02_c", [stamp.format(n="c")], reads=("00_a",))
    assert _run() == 0
    fig = project / "runs" / "quick" / "figures"
    (a0, a1), (b0, b1), (c0, c1) = [map(float, (fig / f"{n}.txt").read_text().split()) for n in "abc"]
    assert a0 < b1 and b0 < a1, "00_a and 01_b did not overlap"
    assert c0 >= a1, "02_c started before 00_a, which it reads, had finished"
