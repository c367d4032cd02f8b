"""The package's layout (issue #18): each module imports only modules of lower-numbered notebooks, function-level
imports of our own modules are the exceptions listed here with their reason, and exported code has no `;`-joined
statements and no line over 120 characters."""
import ast, io, re, sys, tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rapo_nb"
CELL = re.compile(r"^# %% \.\./nbs/(?:(\d{2})_)?([\w-]+)\.ipynb", re.M)
TOP = 99  # unnumbered notebooks (reproduce) sit above every numbered one


def modules() -> dict[str, int]:
    "Module name → the number of the notebook it is exported from (TOP for unnumbered ones)."
    out = {}
    for p in sorted(PKG.glob("*.py")):
        m = CELL.search(p.read_text())
        if m:
            out[p.stem] = int(m.group(1)) if m.group(1) else TOP
    return out


def own_imports(path: Path) -> list[tuple[str, int, bool]]:
    "(imported rapo_nb module, line, at function level) for every import of our own modules in `path`."
    tree, found = ast.parse(path.read_text()), []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level == 1 or mod.startswith("rapo_nb"):
                    base = mod.removeprefix("rapo_nb").lstrip(".")
                    names = [base] if base else [a.name for a in child.names]
                    found.extend((n.split(".")[0], child.lineno, nested) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[1], child.lineno, nested) for a in child.names
                             if a.name.startswith("rapo_nb."))
            visit(child, inner)

    visit(tree, False)
    return found


def test_modules_found():
    mods = modules()
    assert {"config", "state", "consensus", "routing", "runtime"} <= set(mods), mods
    assert mods["config"] == 0


def test_imports_point_down():
    mods, bad = modules(), []
    for name, number in mods.items():
        for target, line, _ in own_imports(PKG / f"{name}.py"):
            if target in mods and mods[target] >= number and target != name:
                bad.append(f"rapo_nb/{name}.py:{line} imports {target} (notebook {mods[target]:02d} ≥ {number:02d})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


# Function-level imports of our own modules, each with its reason; any other one belongs in the module's import cell.
LAZY_IMPORTS = {
    ("evaluation", "evaluation"): "spawned pool workers import the exported function (a notebook's own cannot be pickled)",
    ("evaluation", "runtime"): "the pool worker `_run_job` imports what it runs in the child process",
    ("scaling", "scaling"): "forkserver children import the exported functions",
    ("stats", "stats"): "spawned pool workers of the advantage map import the exported `_run_map_job`",
    ("scaling", "state"): "the memory measurement imports first, so imports are not counted as the deployment's memory",
    ("scaling", "consensus"): "as above (memory measurement baseline)",
    ("scaling", "routing"): "as above (memory measurement baseline)",
    ("scaling", "synthetic"): "memory baseline; and success_at_scale's guarded import of the runtime's pieces",
    ("scaling", "runtime"): "the runtime (simpy, redis, prometheus) stays out of the memory-measurement children",
    ("scaling", "agents"): "as above",
    ("training", "__version__"): "the package's version, read when a checkpoint is written",
}


def test_function_level_imports_have_a_reason():
    mods, bad = modules(), []
    for name in mods:
        for target, line, nested in own_imports(PKG / f"{name}.py"):
            if nested and (name, target) not in LAZY_IMPORTS:
                bad.append(f"rapo_nb/{name}.py:{line} imports {target} inside a function")
    assert not bad, "move these to the module's import cell, or give the reason in LAZY_IMPORTS:\n" + "\n".join(bad)


def test_no_semicolon_statements_or_long_lines():
    bad = []
    for p in sorted(PKG.glob("*.py")):
        if p.name == "_modidx.py":
            continue
        text = p.read_text()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string == ";":
                bad.append(f"{p.name}:{tok.start[0]}: ';'")
        body = text.split('"""', 2)[-1] if text.startswith('"""') else text   # the module docstring is the title
        offset = text[: len(text) - len(body)].count("\n")
        in_all = False
        for i, line in enumerate(body.splitlines(), 1 + offset):
            in_all = line.startswith("__all__") or (in_all and not line.startswith("#"))   # nbdev writes __all__
            if len(line) > 120 and not in_all:
                bad.append(f"{p.name}:{i}: {len(line)} characters")
    assert not bad, "\n".join(bad[:50]) + (f"\n… {len(bad) - 50} more" if len(bad) > 50 else "")

# --- Export cells in nbs/: short enough to read at a glance, each followed by a demonstration (issue #18) ----------
NBS = ROOT / "nbs"
MAX_EXPORT_LINES = 60  # code lines of an export cell, the `#| export` line not counted
MAX_RUN = 3  # export cells that may share one demonstration
DIRECTIVE = re.compile(r"^#\|\s*(\w+)")


def _code_cells(nb: Path) -> list[tuple[int, list[str]]]:
    "(index among all cells, source lines) of every code cell of `nb`."
    import json

    cells = json.loads(nb.read_text())["cells"]
    return [(i, "".join(c["source"]).splitlines()) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def _is_export(lines: list[str]) -> bool:
    return any((m := DIRECTIVE.match(l)) and m.group(1) in ("export", "exporti") for l in lines)


def _cell_name(lines: list[str]) -> str:
    "The first name a cell defines (def, class, else an assignment at column 0): its name in messages and allow-lists."
    for pat in (r"(?:async\s+)?(?:def|class)\s+(\w+)", r"(\w+)\s*(?::[^=]+)?="):
        for l in lines:
            if m := re.match(pat, l):
                return m.group(1)
    return "?"


def _only_imports(lines: list[str]) -> bool:
    "True when the cell's code is imports only (the module's import cell): nothing to demonstrate."
    try:
        tree = ast.parse("\n".join(l for l in lines if not l.startswith("#|")))
    except SyntaxError:
        return False
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


def export_cells() -> list[tuple[str, int, str, int]]:
    "(notebook stem, cell index, first defined name, code lines without the export directive) of every export cell."
    out = []
    for nb in sorted(NBS.glob("*.ipynb")):
        for i, lines in _code_cells(nb):
            if _is_export(lines):
                code = [l for l in lines if not ((m := DIRECTIVE.match(l)) and m.group(1) in ("export", "exporti"))]
                out.append((nb.stem, i, _cell_name(code), len(code)))
    return out


# Export cells over MAX_EXPORT_LINES not split yet, by (notebook, first name): each with its reason. Shrink it.
LONG_CELLS_NOT_YET_SPLIT = {
    ("00_config", "ConsensusConfig"): "a config dataclass: one cf(...) field per constant with its doc; splitting a "
    "section across cells would scatter it",
    ("00_config", "SimulationConfig"): "as above (the simulated world's assumptions, one field each)",
    ("00_config", "WorkflowConfig"): "as above",
    ("00_config", "RouteLLMConfig"): "as above",
    ("00_config", "paper_spec"): "a data table: the paper's constants keyed by the config field that implements each",
    ("21_report", "REPORT_ARTIFACTS"): "a data table: the figures and tables each notebook must leave for the report",
    ("18_workflows", "workflow_claims"): "builds the claims table (not split this session)",
}


def test_export_cells_are_short():
    """Every export cell in nbs/ has at most 60 code lines (the `#| export` line not counted), except the cells in
    LONG_CELLS_NOT_YET_SPLIT; an entry of that list that is short now (or gone) must be removed."""
    cells = export_cells()
    long = {(nb, name): n for nb, _, name, n in cells if n > MAX_EXPORT_LINES}
    bad = [
        f"nbs/{nb}.ipynb: the export cell of `{name}` has {n} lines (> {MAX_EXPORT_LINES})"
        for (nb, name), n in sorted(long.items())
        if (nb, name) not in LONG_CELLS_NOT_YET_SPLIT
    ]
    stale = [
        f"{k}: no longer over {MAX_EXPORT_LINES} lines (or gone): remove it from LONG_CELLS_NOT_YET_SPLIT"
        for k in LONG_CELLS_NOT_YET_SPLIT
        if k not in long
    ]
    assert not bad and not stale, "\n".join(bad + stale)


def _is_demo(lines: list[str]) -> bool:
    "A demonstration or test: a code cell without an export directive that runs more than imports and directives."
    code = [l for l in lines if l.strip() and not l.lstrip().startswith("#")]
    return not _is_export(lines) and bool(code) and not _only_imports(lines)


def undemonstrated_runs() -> list[tuple[str, str, int]]:
    """(notebook, first name of the run, its export cells) of every run that breaks the rule of
    `test_export_cells_are_demonstrated`."""
    out = []
    for nb in sorted(NBS.glob("*.ipynb")):
        run = []
        for _, lines in _code_cells(nb) + [(None, None)]:
            if lines is not None and _is_export(lines):
                if not _only_imports(lines):
                    run.append(_cell_name(lines))
                continue
            if lines is None or _is_demo(lines):
                if run and (lines is None or len(run) > MAX_RUN):
                    out.append((nb.stem, run[0], len(run)))
                run = []
    return out


# Runs of export cells without their demonstration yet, by (notebook, first name of the run): each with its reason.
RUNS_NOT_YET_DEMONSTRATED = {
    ("00_config", "cf"): "17 config dataclasses in a row, checked together after them; not in this wave's split set",
}


def test_export_cells_are_demonstrated():
    """Each export cell is followed by a demonstration before the next export cell, or is part of a short run that is.

    Precisely: walk the code cells of a notebook in order. A *demo* is a code cell without `#| export`/`#| exporti`
    whose code is more than imports, comments and directives (a hidden test cell counts, and so does a `#| slow` one:
    papermill runs it under the quick profile). An export cell that holds imports only (the module's import cell) is
    ignored. The other export cells form *runs*: the export cells between two demos (markdown cells and import-only
    cells may sit in between). Every run must be followed by a demo (so the last export cells of a notebook cannot go
    undemonstrated) and hold at most MAX_RUN = 3 export cells: a class cell and the @patch cells of its methods may
    share one demonstration, a whole module may not."""
    runs = {(nb, name): n for nb, name, n in undemonstrated_runs()}
    bad = [
        f"nbs/{nb}.ipynb: the run of {n} export cell(s) starting at `{name}` is not followed by a demo"
        + (f" (runs hold at most {MAX_RUN})" if n > MAX_RUN else "")
        for (nb, name), n in sorted(runs.items())
        if (nb, name) not in RUNS_NOT_YET_DEMONSTRATED
    ]
    stale = [
        f"{k}: demonstrated now (or gone): remove it from RUNS_NOT_YET_DEMONSTRATED"
        for k in RUNS_NOT_YET_DEMONSTRATED
        if k not in runs
    ]
    assert not bad and not stale, "\n".join(bad + stale)


def test_the_two_rules_on_a_made_up_notebook(tmp_path, monkeypatch):
    "The rules themselves: a long cell is counted without its directive; runs end at demos; a lone last run is caught."
    import json

    def cell(src: str, kind: str = "code") -> dict:
        return dict(cell_type=kind, metadata={}, source=src, **({"outputs": []} if kind == "code" else {}))

    cells = [
        cell("#| export\nimport os"),  # the import cell: ignored
        cell("#| export\ndef a():\n" + "    x = 1\n" * 59 + "    return x"),  # 61 code lines
        cell("a()"),
        cell("#| export\nclass B: ..."),
        cell("Some words.", "markdown"),
        cell("#| export\nC = 1"),
        cell("#| hide\nimport sys"),  # imports only: not a demo
        cell("#| export\ndef d(): ..."),
        cell("#| export\ndef e(): ..."),
        cell("#| slow\nd()"),  # a run of four export cells: too long
        cell("#| export\ndef f(): ..."),  # the last run: never demonstrated
    ]
    (tmp_path / "99_toy.ipynb").write_text(json.dumps(dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)))
    monkeypatch.setattr(sys.modules[__name__], "NBS", tmp_path)
    assert [(nb, name, n) for nb, _, name, n in export_cells() if n > MAX_EXPORT_LINES] == [("99_toy", "a", 61)]
    assert undemonstrated_runs() == [("99_toy", "B", 4), ("99_toy", "f", 1)]
