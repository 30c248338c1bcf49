"""Catalog search benchmarks, each against its baseline in the same run.

    python bench/search.py                              # quick: embed + 20k vectors (make bench)
    python bench/search.py --sizes 100000,1000000       # the issue's table (1M takes long on 2 cores)
    python bench/search.py --only embed --shape 2b --device cuda --dtype bfloat16

embed   inputs/s of shelfsight's encoder (prefill only, batched, engine/encoder.py) at batch 1, 8, 32
        vs transformers' own forward (Qwen3VLModel over the processor's batch) on the same inputs,
        product photo + title each; the random checkpoint is built here.
search  N synthetic unit vectors (clustered, as embeddings are) in a real PostgreSQL + pgvector through
        the catalog store: load rows/s (COPY) and HNSW build rows/s, then 300 noisy queries through
        CatalogStore.search (the gateway's path): p50 / p99 and recall@10 against exact search, next to
        FAISS HNSW (same M and efConstruction) and exact inner-product search (numpy) on the same vectors.
        Also upsert rows/s through CatalogStore.upsert (the Index path's SQL, 2,000 rows).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

M, EF_CONSTRUCTION, EF_SEARCH = 16, 64, 100


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- embed ----
def bench_embed(args) -> None:
    import torch
    from transformers import AutoModel, AutoProcessor

    from shelfsight import params, synth
    from shelfsight.engine import Encoder, EncoderConfig, Prompt
    from shelfsight.export import tiny
    from shelfsight.model import imaging
    from shelfsight.model.checkpoint import load_model
    from shelfsight.model.preprocessing import load_preprocessor
    from shelfsight.model.retrieval import Side, embedding_messages

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="shelfsight-bench-embed-"))
    tiny.build(work, shape=args.shape, seed=0, device=args.device, kind="embedding")
    dtype = getattr(torch, args.dtype)
    ours = load_model(work, device=args.device, dtype=args.dtype)
    theirs = AutoModel.from_pretrained(work, dtype=dtype).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(work)
    pre = load_preprocessor(work, 65_536, 200_704, imaging.ImageLimits(), params.Limits())  # 448x448 max
    encoder = Encoder(ours, pre.tokenizer, "embedding", EncoderConfig(max_batch_tokens=1 << 20, vision_cache_bytes=0))
    samples = synth.samples(max(args.batches), seed=1, size=(448, 448))
    photos = [synth.encode(img) for img, *_ in samples]
    titles = [f"{p.brand} {p.label} {p.spec}" for *_, p in samples]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_ours(n):
        prompts = [Prompt.of(pre.render(embedding_messages(Side(1, titles[i])), [photos[i]])) for i in range(n)]
        encoder.embed(prompts, [0] * n)

    def run_theirs(n):
        msgs = [embedding_messages(Side(1, titles[i])) for i in range(n)]
        text = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
        processor.tokenizer.padding_side = "left"
        inp = processor(text=text, images=[imaging.decode(photos[i]) for i in range(n)], padding=True,
                        return_tensors="pt").to(args.device)
        with torch.inference_mode():
            h = theirs(**inp).last_hidden_state[:, -1]
            torch.nn.functional.normalize(h.float(), dim=-1).cpu()

    print("| batch | shelfsight inputs/s | transformers inputs/s | ratio |\n|---|---|---|---|")
    for n in args.batches:
        rates = {}
        for name, fn in (("ours", run_ours), ("theirs", run_theirs)):
            fn(n)  # warm-up
            times = []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                fn(n)
                sync()
                times.append(time.perf_counter() - t0)
            rates[name] = n / statistics.median(times)
        print(f"| {n} | {rates['ours']:.1f} | {rates['theirs']:.1f} | {rates['ours'] / rates['theirs']:.2f}x |",
              flush=True)


# ---- search ----
def vectors(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    v = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def pg_side(url: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, name: str) -> dict:
    from pgvector import HalfVector
    from psycopg import sql

    from shelfsight.catalog.store import CatalogSettings, CatalogStore, Item

    store = CatalogStore(CatalogSettings(url, name, timeout=7200, migration_timeout=7200))
    await store.open("bench", data.shape[1])
    out = {}
    try:
        t = store.tables
        async with store._connection("bench load") as conn:  # bulk load: the index built after, as at scale
            await conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(f"{name}_items_embedding")))
            await conn.execute("SET maintenance_work_mem = '512MB'")
            t0 = time.perf_counter()
            async with conn.cursor().copy(sql.SQL("COPY {} (id, embedding, tsv) FROM STDIN").format(t.items)) as copy:
                for i, v in enumerate(data):
                    await copy.write_row((f"v{i}", HalfVector(v).to_text(), ""))
            out["copy_rows_s"] = len(data) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            await conn.execute(sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding halfvec_ip_ops) WITH (m = {}, "
                                       "ef_construction = {})").format(sql.Identifier(f"{name}_items_embedding"),
                                                                       t.items, sql.Literal(M), sql.Literal(EF_CONSTRUCTION)))
            out["hnsw_build_s"] = time.perf_counter() - t0
            await conn.execute("ANALYZE " + f"{name}_items")
        lat, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            hits = await store.search(vector=q, top_k=10, candidates=EF_SEARCH)
            lat.append(time.perf_counter() - t0)
            found.append([int(h.id[1:]) for h in hits])
        out |= {"p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000, "recall": recall(found, truth)}
        few = vectors(2000, data.shape[1], seed=9)
        t0 = time.perf_counter()
        for i in range(0, len(few), 200):
            await store.upsert([Item(f"u{i + j}", "", {}, v) for j, v in enumerate(few[i:i + 200])])
        out["upsert_rows_s"] = len(few) / (time.perf_counter() - t0)
    finally:
        await store.drop()
        await store.close()
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))


def bench_search(args) -> None:
    import faiss

    from shelfsight.catalog.postgres import EmbeddedPostgres, PostgresSettings

    folder = Path(tempfile.mkdtemp(prefix="shelfsight-bench-search-"))
    folder.chmod(0o711)
    print(f"| vectors ({args.dim}-d) | store | load rows/s | index build rows/s | p50 ms | p99 ms | recall@10 | "
          "p50 vs FAISS HNSW |\n|---|---|---|---|---|---|---|---|", flush=True)
    with EmbeddedPostgres(PostgresSettings(folder / "data", conf=(("max_parallel_maintenance_workers", "2"),))) as pg:
        for n in args.sizes:
            data = vectors(n, args.dim, seed=n)
            rng = np.random.default_rng(1)
            queries = data[rng.integers(0, n, args.queries)] + 0.05 * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            t0 = time.perf_counter()
            truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
            exact_ms = (time.perf_counter() - t0) / args.queries * 1000
            index = faiss.IndexHNSWFlat(args.dim, M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = EF_CONSTRUCTION
            t0 = time.perf_counter()
            index.add(data)
            faiss_build = time.perf_counter() - t0
            index.hnsw.efSearch = EF_SEARCH
            lat, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                _, ids = index.search(q[None], 10)
                lat.append(time.perf_counter() - t0)
                found.append(ids[0].tolist())
            faiss_p50 = pct(lat, 0.5) * 1000
            pgr = asyncio.run(pg_side(pg.url, data, queries, truth, f"bench{n}"))
            print(f"| {n:,} | PostgreSQL + pgvector HNSW (CatalogStore.search) | {pgr['copy_rows_s']:,.0f} | "
                  f"{n / pgr['hnsw_build_s']:,.0f} | {pgr['p50_ms']:.2f} | {pgr['p99_ms']:.2f} | {pgr['recall']:.3f} | "
                  f"{pgr['p50_ms'] / faiss_p50:.1f}x |", flush=True)
            print(f"| {n:,} | FAISS HNSW (in process) | - | {n / faiss_build:,.0f} | {faiss_p50:.2f} | "
                  f"{pct(lat, 0.99) * 1000:.2f} | {recall(found, truth):.3f} | 1.0x |", flush=True)
            print(f"| {n:,} | exact (numpy, batched) | - | - | {exact_ms:.2f} per query | - | 1.000 | "
                  f"{exact_ms / faiss_p50:.1f}x |", flush=True)
            print(f"| {n:,} | CatalogStore.upsert (the Index path) | {pgr['upsert_rows_s']:,.0f} rows/s, "
                  "index maintained | | | | | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("embed", "search"))
    ap.add_argument("--sizes", default="20000", help="stored vectors, comma-separated")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.only in (None, "embed"):
        print("\n### embed: inputs/s, product photo (448x448) + title each\n", flush=True)
        bench_embed(args)
    if args.only in (None, "search"):
        print("\n### search: latency and recall@10 against exact search, HNSW M=16 efConstruction=64 ef=100\n",
              flush=True)
        bench_search(args)


if __name__ == "__main__":
    main()
