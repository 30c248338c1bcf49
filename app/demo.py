"""`make demo`: the main job on the embedded tiny model, end to end, printing what happens.

Builds the tiny random Qwen3-VL (and a tiny embedding model and reranker), quantizes it to int4 with
GPTQ, lays out the Triton repository, starts tritonserver, an embedded PostgreSQL + pgvector catalog and
the gateway, asks a question about the bundled sample photo through the gateway (again, to show the
cache, and streamed), indexes a few rendered products and searches the catalog by photo, prints the
answers, hits, timings and a few metrics, and stops everything. Answers and rankings are noise: the
weights are random; the plumbing is the real one.
"""
from __future__ import annotations

import asyncio
import importlib.resources
import io
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from shelfsight import ports

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "demo"
SAMPLE = Path(importlib.resources.files("shelfsight") / "data" / "sample-product.jpg")  # ships with the core
QUESTION = "What brand is this product?"


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def show(label: str, r) -> None:
    text = r.text if len(r.text) < 90 else r.text[:87] + "..."
    print(f"   {label:24s} [{r.cache_status:10s}] {r.completion_tokens:3d} tokens, "
          f"{r.total_seconds * 1000:7.1f} ms total, {r.upstream_seconds * 1000:7.1f} ms in Triton  {text!r}")


def metric_lines(url: str, prefixes: tuple[str, ...]) -> list[str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return [line for line in text.splitlines()
            if line.startswith(prefixes) and float(line.rsplit(" ", 1)[1]) != 0]


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image

    from shelfsight import synth
    from shelfsight.catalog.postgres import EmbeddedPostgres, PostgresSettings
    from shelfsight.client import CatalogItem, ShelfsightClient
    from shelfsight.export import tiny
    from shelfsight.export.quantize import QuantizeJob, run
    from shelfsight.export.repository import RepositoryJob, build
    from shelfsight.gateway.server import Gateway
    from shelfsight.gateway.settings import GatewaySettings, SearchSettings
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings
    from shelfsight.ui.cli import start_beside

    t_start = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    step("building the tiny random Qwen3-VL checkpoint (real format, real Qwen tokenizer)")
    t0 = time.perf_counter()
    src = WORK / "tiny"
    src.mkdir()
    tiny.build(src, seed=0)
    print(f"   {src.relative_to(ROOT)} in {time.perf_counter() - t0:.1f}s "
          f"({sum(f.stat().st_size for f in src.iterdir()) / 1e6:.1f} MB)")

    step("quantizing the text decoder to int4 with GPTQ (GPTQModel, in the export environment)")
    manifest = run(QuantizeJob(model=src, scheme="int4", out=WORK / "tiny-int4"), log=lambda m: print("  ", m))
    print(f"   quantized in {manifest['time_s']['quantize']}s; fidelity against bf16 on held-out photos:")
    print(f"     GPTQ int4: logit cosine {manifest['fidelity']['logit_cosine_mean']:.4f}, "
          f"token agreement {manifest['fidelity']['token_agreement']:.3f}")
    print(f"     RTN  int4: logit cosine {manifest['fidelity_rtn']['logit_cosine_mean']:.4f}, "
          f"token agreement {manifest['fidelity_rtn']['token_agreement']:.3f}")

    step("building a tiny embedding model and reranker (the Qwen3-VL-Embedding / -Reranker formats)")
    for kind in ("embedding", "reranker"):
        (WORK / f"tiny-{kind}").mkdir()
        tiny.build(WORK / f"tiny-{kind}", seed=0, kind=kind)
    print("   done")

    step("laying out the Triton repository and starting tritonserver, the catalog (PostgreSQL + pgvector) "
         "and the gateway")
    repo = WORK / "repository"
    served = build(RepositoryJob(model=WORK / "tiny-int4", out=repo, preprocess_instances=1, collect_instances=2,
                                 max_batch=8, embedding=WORK / "tiny-embedding", reranker=WORK / "tiny-reranker"))
    catalog_dir = Path(tempfile.mkdtemp(prefix="shelfsight-demo-catalog-"))
    catalog_dir.chmod(0o711)  # as root the server runs as `nobody`, which must reach its data folder
    t0 = time.perf_counter()
    catalog = EmbeddedPostgres(PostgresSettings(catalog_dir / "data")).start()
    print(f"   catalog postgres ready in {time.perf_counter() - t0:.1f}s on 127.0.0.1:{catalog.port}")
    t0 = time.perf_counter()
    triton = TritonServer(TritonSettings(repo=repo)).start()
    print(f"   tritonserver ready in {time.perf_counter() - t0:.1f}s on {triton.grpc_url} "
          f"(model {served.generator.model_id}, {served.generator.scheme}, {served.device})")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gateway = None
    try:
        gateway = asyncio.run_coroutine_threadsafe(
            Gateway(GatewaySettings(triton_url=triton.grpc_url, port=0, metrics_port=0, health_interval=0.2,
                                    search=SearchSettings(catalog_url=catalog.url))).start(),
            loop).result(60)
        while not gateway.upstream.ready:
            time.sleep(0.1)
        target = ports.local(gateway.port)
        print(f"   gateway ready on {target} (metrics on :{gateway.metrics_port})")
        print(f"   web UI on {start_beside(target).local_url} while the demo runs "
              f"(`shelfsight serve --ui-port {ports.UI}` keeps one up)")

        step(f"asking about {SAMPLE.name}: {QUESTION!r} (seeded, so the answer may be cached)")
        photo = SAMPLE.read_bytes()
        ask = dict(seed=7, max_new_tokens=24)
        with ShelfsightClient(target) as client:
            show("first ask", client.recognize(photo, QUESTION, **ask))
            show("same photo again", client.recognize(photo, QUESTION, **ask))
            img = Image.open(io.BytesIO(photo))
            small = img.resize((int(img.width * 0.9), int(img.height * 0.9)))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=85)
            show("re-encoded, 90% size", client.recognize(buf.getvalue(), QUESTION, **ask))
            show("another question", client.recognize(photo, "Read the label.", **ask))
            print("   streamed: ", end="", flush=True)
            for chunk in client.stream(photo, "List every product you see.", cache="skip", **ask):
                if chunk.final:
                    print(f"\n   -> {chunk.result.completion_tokens} tokens, finish {chunk.result.finish_reason}, "
                          f"{chunk.result.total_seconds * 1000:.0f} ms")
                else:
                    print(chunk.text, end="", flush=True)

        step("indexing 6 rendered products into the catalog, then searching it with a photo of one")
        rng = random.Random(3)
        products = [synth.make_product(rng, category=c) for c in synth.CATEGORIES]
        items = [CatalogItem(f"sku-{i}", synth.encode(synth.render(p, seed=i)),
                             f"{p.brand} {p.label} {p.spec}", {"category": p.category, "brand": p.brand})
                 for i, p in enumerate(products)]
        with ShelfsightClient(target) as client:
            t0 = time.perf_counter()
            results = list(client.index(items))
            print(f"   indexed {sum(r.status == 'indexed' for r in results)} items in "
                  f"{(time.perf_counter() - t0) * 1000:.0f} ms: {client.catalog_info()}")
            query = synth.encode(synth.render(products[2], seed=2, variant="tilted"))
            found = client.search(query, top_k=3, rerank=3)
            print(f"   a tilted photo of sku-2 ({products[2].brand}): {found.total_seconds * 1000:.0f} ms")
            for h in found.hits:
                print(f"     {h.id}  vector {h.vector_score:.4f}  rerank {h.rerank_score:.4f}  {h.text}")

        step("a few metrics")
        for line in metric_lines(f"http://{ports.local(gateway.metrics_port)}/metrics",
                                 ("grpc_server_handled_total", "shelfsight_cache_lookups_total",
                                  "shelfsight_coalesced", "shelfsight_tokens_total", "shelfsight_index_items_total",
                                  "shelfsight_search_stage_seconds_count")):
            print("   gateway", line)
        for line in metric_lines(triton.metrics_url, ("nv_inference_count", "shelfsight_engine_generation_tokens",
                                                      "shelfsight_engine_time_to_first_token_seconds_sum",
                                                      "shelfsight_engine_time_to_first_token_seconds_count")):
            print("   triton ", line)
    finally:
        step("stopping")
        if gateway is not None:
            asyncio.run_coroutine_threadsafe(gateway.stop(grace=10), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        rc = triton.stop()
        catalog.stop()
        shutil.rmtree(catalog_dir, ignore_errors=True)
        print(f"   gateway stopped; tritonserver exited with code {rc}; catalog stopped")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
