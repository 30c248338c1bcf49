"""What batching buys: `pipeline` requests/s at concurrency 8 against concurrency 1, through a real
tritonserver with the tiny model on CPU (or any checkpoint with --model).

    python bench/pipeline.py [--model DIR] [--requests 48] [--new-tokens 32]

Each request is a different 448x448 product photo and a question, greedy, --new-tokens long.
Prints requests/s, tokens/s and latency percentiles per concurrency level and the c8/c1 ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shelfsight import synth  # noqa: E402
from shelfsight.pipeline import PipelineClient  # noqa: E402


def photos(n: int) -> list[bytes]:
    import random

    rng = random.Random(11)
    return [synth.encode(synth.render(synth.make_product(rng), size=(448, 448), seed=i)) for i in range(n)]


async def level(url: str, images: list[bytes], concurrency: int, new_tokens: int) -> dict:
    client = PipelineClient(url)
    queue = list(enumerate(images))
    latencies, tokens = [], 0

    async def worker():
        nonlocal tokens
        while queue:
            i, image = queue.pop()
            t0 = time.perf_counter()
            answer = await client.infer(image, synth.QUESTIONS[i % 5], temperature=0.0, max_new_tokens=new_tokens)
            latencies.append(time.perf_counter() - t0)
            tokens += answer.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    await client.close()
    latencies.sort()
    return {"rps": len(images) / wall, "tps": tokens / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    from shelfsight.export.repository import RepositoryJob, build
    from shelfsight.tritonserver import TritonServer, TritonSettings

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model = args.model
    if model is None:
        from shelfsight.export import tiny

        model = work / "tiny"
        model.mkdir()
        tiny.build(model)
    build(RepositoryJob(model=model, out=work / "repo", preprocess_instances=1, collect_instances=4, max_batch=16))
    images = photos(args.requests)
    with TritonServer(TritonSettings(repo=work / "repo")) as server:
        asyncio.run(level(server.grpc_url, images[:4], 2, 4))  # warm-up
        print(f"# pipeline on {model.name}, {args.requests} requests, {args.new_tokens} new tokens, 448x448")
        print("| concurrency | req/s | tok/s | p50 s | p99 s |")
        print("|---|---|---|---|---|")
        results = {}
        for c in (1, 8):
            r = results[c] = asyncio.run(level(server.grpc_url, images, c, args.new_tokens))
            print(f"| {c} | {r['rps']:.2f} | {r['tps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} |", flush=True)
        print(f"\nconcurrency 8 / 1 throughput ratio: {results[8]['rps'] / results[1]['rps']:.2f}x")


if __name__ == "__main__":
    main()
