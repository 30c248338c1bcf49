"""`make bench` runs a runner that exists, which knows every benchmark in bench/ and keeps each one
inside its time bound. (The benchmarks' numbers are measured by running them, not by tests.)"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)


def test_make_bench_runs_every_benchmark():
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    scripts = re.findall(r"bench/[\w/]+\.py", recipe)
    assert scripts and all((ROOT / s).is_file() for s in scripts), scripts
    on_disk = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")} - {"run_all"}
    assert set(run_all.BENCHMARKS) == on_disk  # a new benchmark must be added to the runner (_x.py: a helper)


def runner(*args):
    return subprocess.run([sys.executable, "bench/run_all.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_benchmark_past_its_time_bound_is_stopped_and_reported():
    r = runner("--only", "preprocess", "--timeout", "1")
    assert r.returncode == 1, r.stderr
    assert "| preprocess | timed out after 1 s |" in r.stdout
    assert "## bench/preprocess.py (time bound 1 s)" in r.stdout


def test_unknown_benchmark_is_named():
    r = runner("--only", "preprocess,warp")
    assert r.returncode == 2 and "unknown benchmark warp" in r.stderr
