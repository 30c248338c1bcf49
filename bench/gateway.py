"""What the gateway adds, on each face, measured in one run against a real tritonserver (tiny model).

    python bench/gateway.py [--rounds 60] [--hits 400]

The gateway runs as its own process (`shelfsight gateway --http-port 0`), as in production; this
process is the client of all three paths, so client-side costs are alike:
1. model calls, cache off: the same kind of request (greedy, 8 new tokens, a 448x448 photo) sent
   directly to Triton's `pipeline_stream` (what the gateway calls), through the gRPC face and through the
   HTTP face, interleaved round by round (a fresh photo per call: Triton's vision cache cannot favour
   one path); p50/p99 of each, the faces' added latency, and the gateway's own time per request as it
   reports it (total - upstream seconds);
2. cache hits on each face: p50/p99 sequential, and requests/s with 8 concurrent clients;
3. a two-picture request against two one-picture requests (sequential, and concurrent).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GEN = dict(temperature=0.0, max_new_tokens=8)
Q = "What brand is this product?"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def chat_body(model: str, pictures: list[bytes], cache: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(p).decode()}}
             for p in pictures]
    return {"model": model, "max_tokens": GEN["max_new_tokens"], "temperature": 0.0, "cache": cache,
            "messages": [{"role": "user", "content": parts + [{"type": "text", "text": Q}]}]}


async def main_async(args, triton_url: str, grpc_target: str, http_base: str) -> None:
    import httpx

    from shelfsight import synth
    from shelfsight.client import AsyncShelfsightClient
    from shelfsight.serving.pipeline import PipelineClient

    rng = random.Random(5)
    n = args.rounds * 3 + 40
    photos = [synth.encode(synth.render(synth.make_product(rng), size=(448, 448), seed=i)) for i in range(n)]
    direct = PipelineClient(triton_url)
    http = httpx.AsyncClient(timeout=120)
    async with AsyncShelfsightClient(grpc_target) as gw:
        model = (await http.get(f"{http_base}/v1/models")).json()["data"][0]["id"]

        async def via_direct(p):
            t0 = time.perf_counter()
            [d async for d in direct.stream(p, Q, **GEN)]
            return time.perf_counter() - t0, None

        async def via_grpc(p, cache="skip"):
            t0 = time.perf_counter()
            r = await gw.recognize(p, Q, cache=cache, **GEN)
            return time.perf_counter() - t0, r.total_seconds - r.upstream_seconds

        async def via_http(p, cache="skip"):
            t0 = time.perf_counter()
            r = await http.post(f"{http_base}/v1/chat/completions", json=chat_body(model, [p], cache))
            body = r.json()
            t = body["shelfsight"]["timings"]
            return time.perf_counter() - t0, t["total_seconds"] - t["upstream_seconds"]

        paths = {"direct `pipeline_stream`": via_direct, "gateway gRPC `Recognize`": via_grpc,
                 "gateway HTTP `/v1/chat/completions`": via_http}
        for fn in paths.values():  # warm every path
            await fn(photos[-1])
        seen = {name: [] for name in paths}
        own = {name: [] for name in paths}
        it = iter(photos)
        names = list(paths)
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]
            for name in order:
                wall, inside = await paths[name](next(it))
                seen[name].append(wall)
                if inside is not None:
                    own[name].append(inside)
        print("## model calls (cache off), interleaved, a fresh photo each\n")
        print("| path | p50 ms | p99 ms | added p50 ms | gateway's own time p50 / p99 ms |\n|---|---|---|---|---|")
        base = statistics.median(seen[names[0]])
        for name in names:
            med = statistics.median(seen[name])
            inside = (f"{ms(statistics.median(own[name]))} / {ms(pct(own[name], .99))}" if own[name] else "-")
            print(f"| {name} | {ms(med)} | {ms(pct(seen[name], .99))} | "
                  f"{'-' if name == names[0] else f'{(med - base) * 1000:+.2f}'} | {inside} |")

        print("\n## cache hits\n\n| face | p50 ms | p99 ms | the gateway's own time p50 ms | req/s sequential | "
              "req/s, 8 clients |\n|---|---|---|---|---|---|")
        hit = photos[-2]
        for name, fn in (("gRPC", via_grpc), ("HTTP", via_http)):
            await fn(hit, "use")
            both = [await fn(hit, "use") for _ in range(args.hits)]
            lat, inside = [w for w, _ in both], [i for _, i in both]
            per = args.hits // 8
            t0 = time.perf_counter()

            async def loop_(fn=fn):
                for _ in range(per):
                    await fn(hit, "use")
            await asyncio.gather(*[loop_() for _ in range(8)])
            rps = per * 8 / (time.perf_counter() - t0)
            print(f"| {name} | {ms(statistics.median(lat))} | {ms(pct(lat, .99))} | {ms(statistics.median(inside))} | "
                  f"{len(lat) / sum(lat):.0f} | {rps:.0f} |")

        print("\n## two pictures in one request vs two requests (gRPC, cache off)\n")
        two, seq, conc = [], [], []
        for i in range(args.pairs):
            a, b = next(it), next(it)
            t0 = time.perf_counter()
            await gw.recognize([a, b], Q, cache="skip", **GEN)
            two.append(time.perf_counter() - t0)
            c, d = next(it), next(it)
            t0 = time.perf_counter()
            await gw.recognize(c, Q, cache="skip", **GEN)
            await gw.recognize(d, Q, cache="skip", **GEN)
            seq.append(time.perf_counter() - t0)
            e, f = next(it), next(it)
            t0 = time.perf_counter()
            await asyncio.gather(gw.recognize(e, Q, cache="skip", **GEN), gw.recognize(f, Q, cache="skip", **GEN))
            conc.append(time.perf_counter() - t0)
        print("| request | p50 ms | ratio to one 2-picture request |\n|---|---|---|")
        for label, xs in (("one request, 2 pictures", two), ("2 requests, 1 picture each, one after the other", seq),
                          ("2 requests, 1 picture each, at once", conc)):
            print(f"| {label} | {ms(statistics.median(xs))} | {statistics.median(xs) / statistics.median(two):.2f}x |")
    await http.aclose()
    await direct.close()


def main() -> None:
    # bench/run_all.py ends a benchmark past its time bound with SIGTERM: exit through the `with`
    # blocks, so the tritonserver and the gateway this started are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--hits", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()

    from shelfsight.export import tiny
    from shelfsight.export.repository import RepositoryJob, build
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    (work / "tiny").mkdir()
    tiny.build(work / "tiny")
    build(RepositoryJob(model=work / "tiny", out=work / "repo", preprocess_instances=1, collect_instances=1, max_batch=8))
    with TritonServer(TritonSettings(repo=work / "repo")) as triton:
        port, http_port = free_port(), free_port()
        gateway = subprocess.Popen([sys.executable, "-m", "shelfsight", "gateway", "--triton", triton.grpc_url,
                                    "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=os.environ | {"HF_HUB_OFFLINE": "1"})
        try:
            line = gateway.stdout.readline()
            assert "gateway ready" in line, line
            time.sleep(1.0)  # the gateway sees Triton ready
            print(f"# what the gateway adds, tiny model on CPU, greedy, {GEN['max_new_tokens']} new tokens, "
                  f"{args.rounds} rounds\n")
            asyncio.run(main_async(args, triton.grpc_url, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"))
        finally:
            gateway.terminate()
            gateway.wait(30)


if __name__ == "__main__":
    main()
