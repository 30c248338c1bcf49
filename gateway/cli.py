"""`shelfsight gateway` (the gRPC front door alone) and `shelfsight serve` (Triton + gateway)."""
from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path


def add_gateway_flags(p) -> None:
    from shelfsight.gateway.settings import CacheSettings

    cache = CacheSettings()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9464)
    p.add_argument("--max-in-flight", type=int, default=64, help="model calls at once (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--cache-mb", type=int, default=256)
    p.add_argument("--cache-ttl", type=float, default=24 * 3600.0, help="seconds")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-perceptual", action="store_true")
    p.add_argument("--phash-bits", type=int, choices=(64, 256), default=256)
    p.add_argument("--max-distance", type=int, default=cache.max_distance,
                   help="pHash bits that may differ for a perceptual candidate")
    p.add_argument("--max-colour-distance", type=float, default=cache.max_colour_distance,
                   help="and how far the 4x4 colour thumbnails may differ (mean, 0..255)")
    p.add_argument("--max-difference", type=float, default=cache.max_difference,
                   help="a candidate is served when no pixel of its 512 px thumbnail disagrees more (see cache.difference)")
    p.add_argument("--cache-sampled", action="store_true", help="also cache sampled answers (no seed, temperature>0)")
    p.add_argument("--redis", help="redis://HOST:PORT/DB: a cache shared by several gateways")


def settings_from(args, triton_url: str):
    from shelfsight.gateway.settings import CacheSettings, GatewaySettings

    return GatewaySettings(
        triton_url=triton_url, host=args.host, port=args.port, metrics_host=args.host, metrics_port=args.metrics_port,
        max_in_flight=args.max_in_flight,
        cache=CacheSettings(enabled=not args.no_cache, max_bytes=args.cache_mb << 20, ttl_seconds=args.cache_ttl,
                            perceptual=not args.no_perceptual, phash_bits=args.phash_bits,
                            max_distance=args.max_distance, max_colour_distance=args.max_colour_distance,
                            max_difference=args.max_difference,
                            cache_sampled=args.cache_sampled, redis_url=args.redis))


def register(sub) -> None:
    g = sub.add_parser("gateway", help="run the gRPC gateway in front of a running Triton")
    g.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC HOST:PORT")
    add_gateway_flags(g)
    g.set_defaults(func=cmd_gateway)

    s = sub.add_parser("serve", help="the main job: start Triton and the gateway together, stop both cleanly")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a Qwen3-VL checkpoint (the repository is laid out for it)")
    src.add_argument("--repo", type=Path, help="a repository from `shelfsight export repository`")
    s.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="with --model: where generate runs")
    s.add_argument("--triton-grpc-port", type=int, default=0, help="0: any free port")
    add_gateway_flags(s)
    s.set_defaults(func=cmd_serve)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def cmd_gateway(args) -> int:
    from shelfsight.gateway.server import serve_forever

    _logging()
    settings = settings_from(args, args.triton)
    asyncio.run(serve_forever(settings, ready=lambda gw: print(
        f"gateway ready on {settings.host}:{gw.port} (metrics :{gw.metrics_port})", flush=True)))
    return 0


def cmd_serve(args) -> int:
    from shelfsight.gateway.server import serve_forever
    from shelfsight.tritonserver import TritonServer, TritonSettings, free_port

    _logging()
    with tempfile.TemporaryDirectory(prefix="shelfsight-serve-") as work:
        repo = args.repo
        if repo is None:
            from shelfsight.export.repository import RepositoryJob, build

            repo = Path(work) / "repository"
            build(RepositoryJob(model=args.model, out=repo, device=args.device))
        grpc_port = args.triton_grpc_port or free_port()
        with TritonServer(TritonSettings(repo=repo, grpc_port=grpc_port)) as triton:
            print(f"triton ready on {triton.grpc_url}", flush=True)
            settings = settings_from(args, triton.grpc_url)
            asyncio.run(serve_forever(settings, ready=lambda gw: print(
                f"gateway ready on {settings.host}:{gw.port} (metrics :{gw.metrics_port})", flush=True)))
        print("stopped", flush=True)
    return 0
