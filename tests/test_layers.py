"""Dependencies run one way (docs/architecture.md): the core (shelfsight/) imports none of the parts,
and inside the core, model <- engine <- serving. Read from the source with ast, so a lazy import
inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "shelfsight"
PARTS = ("gateway", "export", "client", "loadtest", "ui", "evaluation", "app", "catalog")


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "shelfsight" or n.startswith("shelfsight.")}


def modules(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "v1" not in p.parts)


@pytest.mark.parametrize("path", modules(CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_part(path):
    bad = {n for n in imported(path) if n.split(".")[1:2] and n.split(".")[1] in PARTS}
    assert not bad, f"{path.relative_to(ROOT)} imports parts: {sorted(bad)}"


def test_the_core_top_imports_only_itself_and_qwen_constants():
    top = {p.stem for p in CORE.glob("*.py")}
    for path in CORE.glob("*.py"):
        bad = {n for n in imported(path) if n != "shelfsight" and n.split(".")[1] not in top
               and not n.startswith("shelfsight.model.qwen") and n != "shelfsight.model"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("layer, below", [("model", ("engine", "serving")), ("engine", ("serving",))])
def test_core_layers_point_down(layer, below):
    for path in modules(CORE / layer):
        bad = {n for n in imported(path) if n.split(".")[1:2] and n.split(".")[1] in below}
        assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(bad)}"


def test_the_scan_sees_a_violation(tmp_path):
    probe = tmp_path / "x.py"
    probe.write_text("def f():\n    from shelfsight.gateway.cli import register\n")
    assert "shelfsight.gateway.cli" in imported(probe)


def test_python_m_shelfsight_runs_the_composition_root():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "shelfsight", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("export", "triton", "serve", "gateway", "ask", "batch", "loadtest", "eval", "ui"):
        assert command in out.stdout


def test_make_demo_runs_a_module_that_exists_with_its_sample_photo():
    import importlib.util
    import re

    (module,) = re.findall(r"-m ([\w.]+)", next(line for line in (ROOT / "Makefile").read_text().splitlines()
                                                 if "-m " in line and "demo" in line))
    assert importlib.util.find_spec(module) is not None, module
    from shelfsight.app import demo

    assert demo.SAMPLE.is_file(), demo.SAMPLE
