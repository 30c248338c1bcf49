"""The two Triton contracts under load: unary `pipeline` against streamed `pipeline_stream`, at
concurrency 1, 8 and 32, through one real tritonserver with the tiny model on CPU (or --model).

    python bench/pipeline.py [--model DIR] [--requests 16] [--new-tokens 32] [--rounds 3] [--collect-instances N]

Each request is a different 448x448 product photo and a question, greedy, --new-tokens long. Every
run gets pictures no other run has seen, so the engine's vision cache gives neither contract an edge.
A run sends max(--requests, 2 x concurrency) requests from `concurrency` closed-loop workers; a
stream's latency is to its final response. Each level runs --rounds rounds of both contracts, which
go first in turn, so load from elsewhere on the machine falls on both alike. Prints the median
requests/s per contract, latency percentiles over all rounds, and the unary/stream throughput ratio
(1.00: the unary contract keeps up with the streaming one).

    python bench/pipeline.py --soak 60 [--soak-contract stream] [--triton-arg=--log-verbose=1]

only checks stability: 32 closed-loop clients for 60 s, then prints how many requests were answered,
or after how many the server failed, and where the tritonserver log is.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shelfsight import synth  # noqa: E402
from shelfsight.serving.pipeline import PipelineClient  # noqa: E402

LEVELS = (1, 8, 32)


class Photos:
    """Distinct product photos, never the same one twice."""

    def __init__(self):
        import random

        self.rng, self.seed = random.Random(11), 0

    def take(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            out.append(synth.encode(synth.render(synth.make_product(self.rng), size=(448, 448), seed=self.seed)))
            self.seed += 1
        return out


async def one(client: PipelineClient, contract: str, image: bytes, question: str, new_tokens: int) -> int:
    params = dict(temperature=0.0, max_new_tokens=new_tokens)
    if contract == "unary":
        return (await client.infer(image, question, **params)).completion_tokens
    last = None
    async for last in client.stream(image, question, **params):
        pass
    return last.completion_tokens


async def level(url: str, contract: str, images: list[bytes], concurrency: int, new_tokens: int) -> dict:
    client = PipelineClient(url)
    queue = list(enumerate(images))
    latencies, tokens = [], 0

    async def worker():
        nonlocal tokens
        while queue:
            i, image = queue.pop()
            t0 = time.perf_counter()
            tokens += await one(client, contract, image, synth.QUESTIONS[i % 5], new_tokens)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    return {"rps": len(images) / wall, "tps": tokens / wall, "latencies": latencies}


async def soak(url: str, images: list[bytes], seconds: float, contract: str = "unary", clients: int = 32) -> str:
    client, done, t0 = PipelineClient(url), 0, time.perf_counter()

    async def worker(i):
        nonlocal done
        while time.perf_counter() - t0 < seconds:
            await one(client, contract, images[i % len(images)], "Read the label.", 48)
            done += 1

    try:
        await asyncio.gather(*[worker(i) for i in range(clients)])
        return f"held: {done} {contract} requests from {clients} clients in {time.perf_counter() - t0:.0f} s"
    except Exception as e:
        return f"FAILED after {done} requests, {time.perf_counter() - t0:.0f} s: {e}"
    finally:
        await client.close()


def summary(runs: list[dict]) -> dict:
    latencies = sorted(x for r in runs for x in r["latencies"])
    return {"rps": statistics.median(r["rps"] for r in runs), "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    # bench/run_all.py ends a benchmark past its time bound with SIGTERM: exit through the `with`
    # blocks, so the tritonserver this started (in a session of its own) is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--collect-instances", type=int, help="default: the repository's default")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="only the stability run, this long")
    ap.add_argument("--triton-arg", action="append", default=[], help="extra tritonserver argument (repeatable)")
    ap.add_argument("--soak-contract", choices=("unary", "stream"), default="unary")
    args = ap.parse_args()
    from shelfsight.export.repository import RepositoryJob, build
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model = args.model
    if model is None:
        from shelfsight.export import tiny

        model = work / "tiny"
        model.mkdir()
        tiny.build(model)
    sizes = {} if args.collect_instances is None else {"collect_instances": args.collect_instances}
    job = RepositoryJob(model=model, out=work / "repo", preprocess_instances=1, max_batch=16, **sizes)
    build(job)
    photos = Photos()
    with TritonServer(TritonSettings(repo=work / "repo", extra_args=tuple(args.triton_arg))) as server:
        if args.soak:
            print(asyncio.run(soak(server.grpc_url, photos.take(8), args.soak, args.soak_contract)),
                  f"(tritonserver log: {server.log_path})")
            return
        for contract in ("unary", "stream"):  # warm-up
            asyncio.run(level(server.grpc_url, contract, photos.take(4), 2, 4))
        print(f"# pipeline vs pipeline_stream on {model.name}, {args.new_tokens} new tokens, 448x448, "
              f"collect instances {job.collect_instances}, max batch {job.max_batch}, {args.rounds} rounds")
        print("| concurrency | requests | unary req/s | stream req/s | unary/stream | unary p50 / p99 s "
              "| stream p50 / p99 s |")
        print("|---|---|---|---|---|---|---|")
        for c in LEVELS:
            n = max(args.requests, 2 * c)
            runs = {"unary": [], "stream": []}
            for i in range(args.rounds):
                for contract in (("unary", "stream") if i % 2 == 0 else ("stream", "unary")):
                    runs[contract].append(asyncio.run(level(server.grpc_url, contract, photos.take(n), c,
                                                            args.new_tokens)))
            u, s = summary(runs["unary"]), summary(runs["stream"])
            print(f"| {c} | {n} x {args.rounds} | {u['rps']:.2f} | {s['rps']:.2f} | {u['rps'] / s['rps']:.2f}x "
                  f"| {u['p50']:.2f} / {u['p99']:.2f} | {s['p50']:.2f} / {s['p99']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
