"""The docs site: titles, the sidebar in reading order, links between notebooks, and nbdev-proc-nbs.

Quarto cannot be installed on our machines, so the site itself is built by .github/workflows/docs.yml;
here we run nbdev's notebook processing (everything before Quarto renders) and check its output."""
import os, re, shutil, stat, subprocess, sys
from pathlib import Path
import nbformat, yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"


def notebooks() -> list[Path]:
    return sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def reading_order() -> list[str]:
    names = [p.name for p in notebooks()]
    numbered = sorted(n for n in names if re.match(r"^\d{2}_", n))
    return ["index.ipynb"] + numbered + sorted(n for n in names if n not in numbered and n != "index.ipynb")


def test_every_notebook_has_title_and_subtitle():
    for p in notebooks():
        md = [c for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown"]
        assert md, f"{p.name}: no markdown cell"
        lines = md[0].source.strip().splitlines()
        assert lines[0].startswith("# ") and len(lines[0]) > 3, f"{p.name}: first markdown cell must start with '# Title'"
        assert len(lines) > 1 and lines[1].startswith("> "), f"{p.name}: '> subtitle' must follow the title"


def _flatten(contents: list) -> list[str]:
    "Sidebar entries in order, sections opened."
    out = []
    for c in contents:
        if isinstance(c, str):
            out.append(c)
        elif "contents" in c:
            out.extend(_flatten(c["contents"]))
        else:
            out.append(c.get("href"))
    return out


def test_sidebar_lists_every_notebook_in_reading_order():
    side = yaml.safe_load((NBS / "sidebar.yml").read_text())
    contents = side["website"]["sidebar"]["contents"]
    assert _flatten(contents) == reading_order()


def test_sidebar_puts_the_neighbouring_systems_under_extensions():
    side = yaml.safe_load((NBS / "sidebar.yml").read_text())
    sections = {c["section"]: c["contents"] for c in side["website"]["sidebar"]["contents"] if isinstance(c, dict)}
    assert {"18_workflows.ipynb", "19_service.ipynb"} <= set(sections.get("Extensions", [])), sections.keys()


def test_links_between_notebooks_resolve():
    for p in notebooks():
        for c in nbformat.read(p, as_version=4).cells:
            if c.cell_type != "markdown": continue
            for target in re.findall(r"\]\(([^)#\s]+\.ipynb)", c.source):
                assert (NBS / target).exists(), f"{p.name}: link to missing notebook {target}"


def test_nbdev_proc_nbs_processes_every_notebook(tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "nbs", proj / "nbs"); shutil.copytree(ROOT / "rapo_nb", proj / "rapo_nb")
    shutil.copy(ROOT / "pyproject.toml", proj / "pyproject.toml")
    # a stand-in `quarto` on PATH so nbdev does not try to download Quarto; proc-nbs itself never calls it
    shim = tmp_path / "bin"; shim.mkdir(); q = shim / "quarto"
    q.write_text("#!/bin/sh\necho 'quarto is not available on this machine' >&2\nexit 1\n"); q.chmod(q.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}")
    exe = Path(sys.executable).parent / "nbdev-proc-nbs"
    r = subprocess.run([str(exe)], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for p in notebooks():
        out = proj / "_proc" / p.name
        assert out.exists(), f"nbdev-proc-nbs did not process {p.name}"
        first = nbformat.read(out, as_version=4).cells[0]
        assert first.cell_type == "raw" and "title:" in first.source, f"{p.name}: no title front matter after processing"
