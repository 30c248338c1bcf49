"""Gateway overhead and cache speed, measured in one run against a real tritonserver (tiny model).

    python bench/gateway.py [--requests 40] [--hits 400]

1. The same requests (greedy, 8 new tokens, 448x448 photos) sent directly to Triton (`pipeline`, and
   `pipeline_stream` with the deltas joined, which is what the gateway does) and through the gateway
   with caching off: p50/p99 of each and the gateway's added latency.
2. Cache hits: one answer cached, then the same request repeated: p50 latency and requests/s,
   sequential and with 8 concurrent clients.
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


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def timed(coro_factory, n):
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await coro_factory(i)
        out.append(time.perf_counter() - t0)
    return out


async def main_async(args, triton_url, gateway_factory):
    import random

    from shelfsight import synth
    from shelfsight.client import AsyncShelfsightClient
    from shelfsight.serving.pipeline import PipelineClient

    rng = random.Random(5)
    photos = [synth.encode(synth.render(synth.make_product(rng), size=(448, 448), seed=i)) for i in range(args.requests)]
    q, gen = "What brand is this product?", dict(temperature=0.0, max_new_tokens=8)
    direct = PipelineClient(triton_url)
    await direct.infer(photos[0], q, **gen)
    u = await timed(lambda i: direct.infer(photos[i], q, **gen), args.requests)

    async def joined(i):
        return [x async for x in direct.stream(photos[i], q, **gen)]
    await joined(0)
    d = await timed(joined, args.requests)
    await direct.close()

    async with gateway_factory(cache=False) as target, AsyncShelfsightClient(target) as c:
        await c.recognize(photos[0], q, **gen)
        g = await timed(lambda i: c.recognize(photos[i], q, **gen), args.requests)
    print("| path | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| direct `pipeline` (unary ensemble, BLS hop through `collect`) | {statistics.median(u) * 1000:.1f} | "
          f"{pct(u, .99) * 1000:.1f} |")
    print(f"| direct `pipeline_stream`, deltas joined (the gateway's own path) | {statistics.median(d) * 1000:.1f} | "
          f"{pct(d, .99) * 1000:.1f} |")
    print(f"| gateway `Recognize`, cache off | {statistics.median(g) * 1000:.1f} | {pct(g, .99) * 1000:.1f} |")
    print(f"\ngateway overhead over its upstream path: p50 {(statistics.median(g) - statistics.median(d)) * 1000:+.2f} ms "
          f"({statistics.median(g) / statistics.median(d):.3f}x), p99 {(pct(g, .99) - pct(d, .99)) * 1000:+.2f} ms")

    async with gateway_factory(cache=True) as target, AsyncShelfsightClient(target) as c:
        first = await c.recognize(photos[0], q, **gen)
        hits = await timed(lambda i: c.recognize(photos[0], q, **gen), args.hits)
        t0 = time.perf_counter()
        per = args.hits // 8

        async def client_loop():
            for _ in range(per):
                r = await c.recognize(photos[0], q, **gen)
                assert r.cache_status == "exact"
        await asyncio.gather(*[client_loop() for _ in range(8)])
        concurrent_rps = per * 8 / (time.perf_counter() - t0)
    print(f"\ncache hits ({args.hits} sequential, then {per * 8} from 8 concurrent clients; miss took "
          f"{first.total_seconds * 1000:.0f} ms):")
    print(f"  p50 {statistics.median(hits) * 1000:.2f} ms, p99 {pct(hits, .99) * 1000:.2f} ms, "
          f"{len(hits) / sum(hits):.0f} req/s sequential, {concurrent_rps:.0f} req/s with 8 clients")
    print(f"  a hit is {statistics.median(d) / statistics.median(hits):.0f}x faster than asking the model (p50)")


def main() -> None:
    # bench/run_all.py ends a benchmark past its time bound with SIGTERM: exit through the `with`
    # blocks, so the tritonserver this started (in a session of its own) is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--hits", type=int, default=400)
    args = ap.parse_args()
    import contextlib

    from shelfsight.export import tiny
    from shelfsight.export.repository import RepositoryJob, build
    from shelfsight.gateway.server import Gateway
    from shelfsight.gateway.settings import CacheSettings, GatewaySettings
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    (work / "tiny").mkdir()
    tiny.build(work / "tiny")
    build(RepositoryJob(model=work / "tiny", out=work / "repo", preprocess_instances=1, collect_instances=2, max_batch=8))
    with TritonServer(TritonSettings(repo=work / "repo")) as triton:

        @contextlib.asynccontextmanager
        async def gateway(cache: bool):
            gw = await Gateway(GatewaySettings(triton_url=triton.grpc_url, port=0, metrics_port=0, health_interval=0.2,
                                               cache=CacheSettings(enabled=cache))).start()
            while not gw.upstream.ready:
                await asyncio.sleep(0.05)
            try:
                yield f"127.0.0.1:{gw.port}"
            finally:
                await gw.stop(grace=5)

        print(f"# gateway overhead, tiny model on CPU, {args.requests} distinct requests, greedy, 8 new tokens\n")
        asyncio.run(main_async(args, triton.grpc_url, gateway))


if __name__ == "__main__":
    main()
