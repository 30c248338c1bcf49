"""Shared fixtures: the tiny random Qwen3-VL checkpoint and its quantized exports, built once per
test session through the same code the `shelfsight export` commands run."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from shelfsight.export import tiny

    out = tmp_path_factory.mktemp("tiny")
    tiny.build(out, seed=0)
    return out


@pytest.fixture(scope="session")
def exports(tiny_checkpoint, tmp_path_factory) -> dict:
    """{scheme: (checkpoint dir, manifest)} for bf16, int8 and int4 (GPTQ) of the tiny model."""
    from shelfsight.export.quantize import QuantizeJob, run

    base = tmp_path_factory.mktemp("exports")
    out = {}
    for scheme in ("bf16", "int8", "int4"):
        manifest = run(QuantizeJob(model=tiny_checkpoint, scheme=scheme, out=base / scheme, samples=12),
                       log=lambda *_: None)
        out[scheme] = (base / scheme, manifest)
    return out


def shelfsight(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `shelfsight` command line in a child process."""
    return subprocess.run([sys.executable, "-m", "shelfsight", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def make_repository(checkpoint: Path, out: Path, **overrides) -> Path:
    """A Triton repository sized for a 2-core test machine."""
    from shelfsight.export.repository import RepositoryJob, build

    settings = dict(preprocess_instances=1, collect_instances=2, max_batch=8) | overrides
    build(RepositoryJob(model=checkpoint, out=out, **settings))
    return out


@contextlib.contextmanager
def running_triton(repo: Path):
    from shelfsight.tritonserver import TritonServer, TritonSettings

    server = TritonServer(TritonSettings(repo=repo, startup_timeout=240))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton(tiny_checkpoint, tmp_path_factory):
    """A real tritonserver serving the tiny bf16 checkpoint (computing in fp32 on CPU)."""
    with running_triton(make_repository(tiny_checkpoint, tmp_path_factory.mktemp("repo") / "bf16")) as server:
        yield server


def run(coro):
    return asyncio.run(coro)
