"""Short, bounded Locust runs of every scenario against the real stack (tiny model, loopback)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def loadtest(gateway, tmp_path, scenario, *extra, duration=10, users=3):
    out = tmp_path / scenario
    r = subprocess.run([sys.executable, "-m", "shelfsight", "loadtest", "--scenario", scenario,
                        "--target", f"127.0.0.1:{gateway.port}",
                        "--metrics", f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                        "--users", str(users), "--spawn-rate", "3", "--duration", str(duration), "--out", str(out),
                        "--max-new-tokens", "12", *extra], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert (out / "summary.json").exists(), r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    for name in ("summary.md", "locust_stats.csv", "report.html"):
        assert (out / name).exists(), name
    return r, summary


@pytest.mark.parametrize("scenario", ["cold", "hot", "near_duplicate", "mixed"])
def test_scenario_runs_clean(gateway, tmp_path, scenario):
    r, s = loadtest(gateway, tmp_path, scenario)
    agg, cache = s["aggregate"], s["cache"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert agg["requests"] >= 5 and agg["failures"] == 0
    assert cache["cache_lookups"] >= agg["requests"] - 1  # the gateway saw the traffic
    if scenario == "cold":
        assert cache["exact_hits"] == 0 and cache["perceptual_hits"] == 0  # every picture is new
    if scenario == "hot":
        assert cache["exact_hit_ratio"] >= 0.7
    if scenario == "near_duplicate":
        # variants re-encoded, resized and cropped by <= 1%: the crops move pHash most, and the safe
        # threshold lets only the nearer ones through; exact hits can only come from the originals
        assert cache["perceptual_hits"] >= 3 and cache["perceptual_hits"] > cache["exact_hits"]
    if scenario == "mixed":
        assert "grpc-ttft RecognizeStream" in s["by_name"] and "grpc RecognizeStream" in s["by_name"]
        assert s["by_name"]["grpc Recognize"]["requests"] > 0
    assert f"# Load test: {scenario}" in (tmp_path / scenario / "summary.md").read_text()


def test_step_shape(gateway, tmp_path, monkeypatch):
    monkeypatch.setenv("SHELFSIGHT_STEP_SECONDS", "3")
    monkeypatch.setenv("SHELFSIGHT_STEP_USERS", "1")
    monkeypatch.setenv("SHELFSIGHT_STEP_MAX_USERS", "3")
    r, s = loadtest(gateway, tmp_path, "hot", "--step", duration=9)
    assert r.returncode == 0 and s["step"] and s["aggregate"]["failures"] == 0
    assert s["aggregate"]["requests"] >= 5
