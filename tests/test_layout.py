"""The package's layout (issue #18): each module imports only modules of lower-numbered notebooks, function-level
imports of our own modules are the exceptions listed here with their reason, and exported code has no `;`-joined
statements and no line over 120 characters."""
import ast, io, re, tokenize
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
