"""How much memory the gateway's picture work takes and keeps: the perceptual cache's decoding under a
fuzz-like load, measured as the process's RSS.

    python bench/gateway_memory.py [--requests N] [--concurrency C]

Each mode runs in a fresh process: the gateway's request check (validate) then the cache lookup and,
after a miss, the store of an answer - what the service does for every request - on a mix of pictures:
small and large photos (JPEG, PNG, WebP), flat 36 MP PNGs (a few KB that decode to 108 MB), pixel
bombs over the limit, and crafted headers. It prints the RSS growth at the peak and after the load
(the cache's own bytes subtracted: those are bounded by its LRU), for

    now                    the header check, the decode budget, pictures reduced before they are kept,
                           and glibc told to return freed blocks (gateway.server.return_freed_memory)
    without mallopt        the same, glibc's defaults
    without decode budget  the same, every picture decoded at once
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {"now": {}, "without mallopt": {"mallopt": False}, "without decode budget": {"budget": False}}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def workload(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    from tests import imagefiles

    rng = random.Random(seed)
    out = []
    flat_png = imagefiles.encode(Image.new("RGB", (6000, 6000), (200, 30, 40)), "PNG")  # 36 MP, tiny file
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:
            out.append(flat_png)
        elif kind < 0.25:
            out.append(imagefiles.png_bomb(13_000, 13_000))
        elif kind < 0.3:
            out.append(b"\xff\xd8\xff" + b"\xff" * 600_000)
        else:
            w, h = rng.randint(64, 2400), rng.randint(64, 2000)
            fmt = rng.choice(("JPEG", "PNG", "WEBP"))
            out.append(imagefiles.encode(imagefiles.photo(w, h, seed=i), fmt,
                                         **({"quality": 85} if fmt != "PNG" else {})))
    return out


async def drive(images: list[bytes], concurrency: int, budget: bool) -> dict:
    from shelfsight.errors import InvalidArgument
    from shelfsight.gateway import cache
    from shelfsight.gateway.settings import CacheSettings
    from shelfsight.conversation import Conversation
    from shelfsight.gateway.validate import Ask, validate
    from shelfsight.model.imaging import ImageLimits
    from shelfsight.params import GenerationParams, Limits

    settings = CacheSettings() if budget else dataclasses.replace(CacheSettings(), decode_pixels=1 << 40)
    rc = cache.ResultCache(settings, cache.MemoryStore(settings.max_bytes))
    gate = asyncio.Semaphore(concurrency)
    refused = 0

    async def one(i: int, image: bytes) -> None:
        nonlocal refused
        async with gate:
            try:
                c = validate(Ask((image,), Conversation.ask(f"q{i}"), classic=True), Limits(), ImageLimits(),
                             GenerationParams())
            except InvalidArgument:
                refused += 1
                return
            probe = cache.Probe(cache.make_key(c.pictures, c.conversation, {}, "bench", False), encoded=c.encoded[0])
            if await rc.lookup(probe, image, lambda *_: None) is None:
                await asyncio.sleep(0.05)  # the model call, during which the probe is held
                await rc.put(probe, image, cache.CachedAnswer("answer", "bench", 1, 1, "stop", time.time()))

    await asyncio.gather(*(one(i, im) for i, im in enumerate(images)))
    return {"refused": refused, "cache_bytes": rc.stats()[1]}


def child(mode: str, n: int, concurrency: int) -> None:
    opts = MODES[mode]
    if opts.get("mallopt", True):
        from shelfsight.gateway.server import return_freed_memory

        return_freed_memory()
    images = workload(n)
    import gc

    gc.collect()
    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = asyncio.run(drive(images, concurrency, opts.get("budget", True)))
    seconds = time.perf_counter() - t0
    gc.collect()
    time.sleep(0.2)
    stop.set()
    t.join()
    print(json.dumps(out | {"peak": peak[0] - base, "after": rss() - base, "seconds": seconds}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.requests, args.concurrency)
        return 0
    print(f"{args.requests} requests, {args.concurrency} at once (RSS growth over the process before the load; "
          "'after' less the cache's own bytes)")
    print(f"{'mode':24s} {'peak MB':>8s} {'after MB':>9s} {'cache MB':>9s} {'refused':>8s} {'seconds':>8s}")
    for mode in MODES:
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--requests", str(args.requests),
                            "--concurrency", str(args.concurrency)], capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{mode:24s} {m['peak'] / 1e6:8.0f} {(m['after'] - m['cache_bytes']) / 1e6:9.0f} "
              f"{m['cache_bytes'] / 1e6:9.1f} {m['refused']:8d} {m['seconds']:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
