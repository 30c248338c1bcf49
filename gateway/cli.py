"""`shelfsight gateway` (the gRPC front door alone) and `shelfsight serve` (Triton + gateway)."""
from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from shelfsight.export.cli import add_repository_flags


def add_gateway_flags(p) -> None:
    from shelfsight.gateway.settings import CacheSettings, GatewaySettings

    s, cache = GatewaySettings(), CacheSettings()
    p.add_argument("--host", default=s.host, help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--metrics-port", type=int, default=s.metrics_port)
    p.add_argument("--max-in-flight", type=int, default=s.max_in_flight,
                   help="model calls at once (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--cache-mb", type=int, default=cache.max_bytes >> 20)
    p.add_argument("--cache-ttl", type=float, default=cache.ttl_seconds, help="seconds")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-perceptual", action="store_true")
    p.add_argument("--phash-bits", type=int, choices=(64, 256), default=cache.phash_bits)
    p.add_argument("--max-distance", type=int, default=cache.max_distance,
                   help="pHash bits that may differ for a perceptual candidate")
    p.add_argument("--max-colour-distance", type=float, default=cache.max_colour_distance,
                   help="and how far the 4x4 colour thumbnails may differ (mean, 0..255)")
    p.add_argument("--max-difference", type=float, default=cache.max_difference,
                   help="a candidate is served when no pixel of its 512 px thumbnail disagrees more (see likeness.difference)")
    p.add_argument("--no-cache-sampled", dest="cache_sampled", action="store_false",
                   help="cache only greedy and seeded answers, not sampled ones (temperature>0, no seed: "
                        "the serving defaults; cached by default, REFRESH gives a fresh draw)")
    p.add_argument("--redis", help="redis://HOST:PORT/DB: a cache shared by several gateways")
    p.add_argument("--shutdown-grace", type=float, default=s.shutdown_grace,
                   help="seconds in-flight requests get to finish on SIGTERM (longer than the longest answer)")


def settings_from(args, triton_url: str):
    from shelfsight.gateway.settings import CacheSettings, GatewaySettings

    return GatewaySettings(
        triton_url=triton_url, triton_dns=getattr(args, "triton_dns", None), host=args.host, port=args.port, metrics_host=args.host, metrics_port=args.metrics_port,
        max_in_flight=args.max_in_flight, shutdown_grace=args.shutdown_grace,
        cache=CacheSettings(enabled=not args.no_cache, max_bytes=args.cache_mb << 20, ttl_seconds=args.cache_ttl,
                            perceptual=not args.no_perceptual, phash_bits=args.phash_bits,
                            max_distance=args.max_distance, max_colour_distance=args.max_colour_distance,
                            max_difference=args.max_difference,
                            cache_sampled=args.cache_sampled, redis_url=args.redis))


def register(sub) -> None:
    from shelfsight.gateway.settings import GatewaySettings

    g = sub.add_parser("gateway", help="run the gRPC gateway in front of a running Triton")
    to = g.add_mutually_exclusive_group()
    to.add_argument("--triton", default=GatewaySettings.triton_url,
                    help="Triton gRPC HOST:PORT, or several comma-separated (one per replica)")
    to.add_argument("--triton-dns", metavar="NAME:PORT",
                    help="re-resolve NAME every few seconds; each address is a replica (a headless Service)")
    add_gateway_flags(g)
    g.set_defaults(func=cmd_gateway)

    s = sub.add_parser("serve", help="the main job: start Triton and the gateway together, keep Triton up "
                       "(restarts it when it or a model process dies), stop both cleanly")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a Qwen3-VL checkpoint (the repository is laid out for it)")
    src.add_argument("--repo", type=Path, help="a repository from `shelfsight export repository`")
    add_repository_flags(s)
    add_triton_flags(s, prefix="triton-")
    add_gateway_flags(s)
    s.add_argument("--ui-port", type=int, help="also serve the web UI (`shelfsight ui`) on this port, on --host")
    s.set_defaults(func=cmd_serve)


def add_triton_flags(p, prefix: str = "") -> None:
    """Triton's ports: fixed defaults, the ones monitoring/prometheus.yml scrapes (0: any free port)."""
    from shelfsight import ports
    from shelfsight.supervisor import RestartPolicy

    p.add_argument(f"--{prefix}grpc-port", type=int, default=ports.TRITON_GRPC)
    p.add_argument(f"--{prefix}http-port", type=int, default=ports.TRITON_HTTP)
    p.add_argument(f"--{prefix}metrics-port", type=int, default=ports.TRITON_METRICS)
    p.add_argument(f"--{prefix}log", type=Path, help="tritonserver's log file (default: in a temporary folder)")
    p.add_argument("--max-restarts", type=int, default=RestartPolicy.max_failures,
                   help="give up (exit 1) after Triton failed this many times in a row")


def triton_settings(args, repo: Path, host: str, prefix: str = ""):
    from shelfsight.tritonserver import TritonSettings, free_port

    def port(name):
        return getattr(args, f"{prefix}{name}_port") or free_port()
    return TritonSettings(repo=repo, host=host, grpc_port=port("grpc"), http_port=port("http"),
                          metrics_port=port("metrics"), log_path=getattr(args, f"{prefix}log"))


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
    _logging()
    with tempfile.TemporaryDirectory(prefix="shelfsight-serve-") as work:
        repo = args.repo
        if repo is None:
            from shelfsight.export.cli import repository_job
            from shelfsight.export.repository import build

            repo = Path(work) / "repository"
            build(repository_job(args, args.model, repo))
        rc = asyncio.run(_serve(args, triton_settings(args, repo, "127.0.0.1", prefix="triton_")))
    print("stopped" if rc == 0 else f"stopped with errors (exit code {rc})", flush=True)
    return rc


async def _serve(args, triton_config) -> int:
    """Triton under a supervisor, the gateway in front; SIGTERM stops the gateway first (in-flight
    requests finish), then Triton. Giving up on Triton stops everything with exit code 1."""
    import signal

    from shelfsight.gateway.server import Gateway
    from shelfsight.supervisor import RestartPolicy, Supervisor

    stop, triton_stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # first: a signal during start-up must not kill us half-way
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(triton_config, RestartPolicy(max_failures=args.max_restarts))
    triton = await asyncio.to_thread(supervisor.start)
    if stop.is_set():  # stopped while Triton was starting: nothing else to start
        await asyncio.to_thread(triton.stop)
        return 0
    settings = settings_from(args, triton.grpc_url)
    try:
        gateway = await Gateway(settings).start()
    except BaseException:
        await asyncio.to_thread(triton.stop)
        raise
    supervisor.on_down = gateway.upstream.mark_broken
    supervisor.on_up = lambda server: gateway.upstream.poke()
    ui = None
    if args.ui_port is not None:
        from shelfsight.ui.cli import start_beside

        try:
            ui = await asyncio.to_thread(start_beside, f"127.0.0.1:{gateway.port}", args.ui_port, args.host)
        except BaseException:
            await gateway.stop()
            await asyncio.to_thread(triton.stop)
            raise
    print(f"serving: gateway {settings.host}:{gateway.port}, gateway metrics "
          f"http://{settings.metrics_host}:{gateway.metrics_port}/metrics; {triton.addresses()}"
          + (f"; web UI {ui.local_url}" if ui else ""), flush=True)
    watch = asyncio.create_task(supervisor.run(triton_stop))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if watch.done() and watch.exception() is not None:
        logging.getLogger("shelfsight.serve").error("%s", watch.exception())
        rc = 1
    logging.getLogger("shelfsight.serve").info("shutting down: finishing in-flight requests")
    stopping.cancel()
    if ui:
        ui.close()
    await gateway.stop()
    triton_stop.set()
    try:
        await watch
    except Exception:  # noqa: BLE001 - already reported above
        pass
    return rc or triton_exit(supervisor)


def triton_exit(supervisor) -> int:
    """0 when the last tritonserver stopped cleanly, else 1 (and why, from its log)."""
    if supervisor.exit_code in (0, None):
        return 0
    print(f"tritonserver exited with code {supervisor.exit_code}:\n{supervisor.server.log_tail(10)}",
          file=sys.stderr, flush=True)
    return 1
