"""`shelfsight serve` (the main job: Triton under its supervisor, the gateway in front, optionally the
web UI beside it, stopped cleanly together) and `shelfsight triton` (the supervised tritonserver alone).
They put the parts together, so they live in the composition root."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from shelfsight import ports
from shelfsight.export.cli import add_repository_flags
from shelfsight.gateway.cli import add_gateway_flags, configure_logging, settings_from


def register(sub) -> None:
    t = sub.add_parser("triton", help="run the bundled tritonserver on a repository until Ctrl-C/SIGTERM, "
                       "restarting it when it or a model process dies")
    t.add_argument("--repo", required=True, type=Path)
    t.add_argument("--host", default=ports.LOCALHOST, help="address to bind (0.0.0.0 for all)")
    add_triton_flags(t)
    t.set_defaults(func=cmd_triton)

    s = sub.add_parser("serve", help="the main job: start Triton and the gateway together, keep Triton up "
                       "(restarts it when it or a model process dies), stop both cleanly")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a Qwen3-VL checkpoint (the repository is laid out for it)")
    src.add_argument("--repo", type=Path, help="a repository from `shelfsight export repository`")
    add_repository_flags(s)
    add_triton_flags(s, prefix="triton-")
    add_gateway_flags(s)
    s.add_argument("--ui-port", type=int, help="also serve the web UI (`shelfsight ui`) on this port, on --host")
    s.add_argument("--ui-auth-file", type=Path, help="the UI's login: lines of USER:PASSWORD")
    s.add_argument("--ui-api-key-file", type=Path, help="the key the UI calls the gateway with (with --api-keys)")
    s.add_argument("--ui-tls-ca", type=Path, help="the CA the UI trusts for the gateway's TLS (default: --tls-cert, a "
                   "self-signed certificate naming 127.0.0.1)")
    s.add_argument("--catalog-dir", type=Path, help="the embedded catalog's data folder (PostgreSQL + pgvector, "
                   "started when an embedding model is served and no --catalog URL is given; default "
                   "/var/lib/shelfsight/catalog as root, else ~/.local/share/shelfsight/catalog)")
    s.set_defaults(func=cmd_serve)


def add_triton_flags(p, prefix: str = "") -> None:
    """Triton's ports: fixed defaults, the ones monitoring/prometheus.yml scrapes (0: any free port)."""
    from shelfsight.serving.supervisor import RestartPolicy

    p.add_argument(f"--{prefix}grpc-port", type=int, default=ports.TRITON_GRPC)
    p.add_argument(f"--{prefix}http-port", type=int, default=ports.TRITON_HTTP)
    p.add_argument(f"--{prefix}metrics-port", type=int, default=ports.TRITON_METRICS)
    p.add_argument(f"--{prefix}log", type=Path, help="tritonserver's log file (default: in a temporary folder)")
    p.add_argument("--max-restarts", type=int, default=RestartPolicy.max_failures,
                   help="give up (exit 1) after Triton failed this many times in a row")


def triton_settings(args, repo: Path, host: str, prefix: str = ""):
    from shelfsight.serving.tritonserver import TritonSettings, free_port

    def port(name):
        return getattr(args, f"{prefix}{name}_port") or free_port()
    return TritonSettings(repo=repo, host=host, grpc_port=port("grpc"), http_port=port("http"),
                          metrics_port=port("metrics"), log_path=getattr(args, f"{prefix}log"))


def cmd_serve(args) -> int:
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="shelfsight-serve-") as work:
        from shelfsight.serving import lifecycle

        lifecycle.claim(Path(work))  # a serve killed at once leaves it: the next start removes it
        repo = args.repo
        if repo is None:
            from shelfsight.export.cli import repository_job
            from shelfsight.export.repository import build

            repo = Path(work) / "repository"
            build(repository_job(args, args.model, repo))
        rc = asyncio.run(_serve(args, triton_settings(args, repo, ports.LOCALHOST, prefix="triton_")))
    print("stopped" if rc == 0 else f"stopped with errors (exit code {rc})", flush=True)
    return rc


async def _serve(args, triton_config) -> int:
    """Triton under a supervisor, the gateway in front; SIGTERM stops the gateway first (in-flight
    requests finish), then Triton. Giving up on Triton stops everything with exit code 1."""
    from shelfsight.gateway.server import Gateway
    from shelfsight.serving.supervisor import RestartPolicy, Supervisor

    stop, triton_stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # first: a signal during start-up must not kill us half-way
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(triton_config, RestartPolicy(max_failures=args.max_restarts))
    catalog = await asyncio.to_thread(start_catalog, args, triton_config.repo)
    try:
        triton = await asyncio.to_thread(supervisor.start)
    except BaseException:
        if catalog:
            await asyncio.to_thread(catalog.stop)
        raise
    if stop.is_set():  # stopped while Triton was starting: nothing else to start
        await asyncio.to_thread(triton.stop)
        if catalog:
            await asyncio.to_thread(catalog.stop)
        return 0
    settings = settings_from(args, triton.grpc_url, catalog.url if catalog else None)
    try:
        gateway = await Gateway(settings).start()
    except BaseException:
        await asyncio.to_thread(triton.stop)
        if catalog:
            await asyncio.to_thread(catalog.stop)
        raise
    catalog_stop = asyncio.Event()
    catalog_watch = None
    if catalog:
        from shelfsight.catalog.postgres import keep_alive

        catalog_watch = asyncio.create_task(keep_alive(catalog, catalog_stop))
    supervisor.on_down = gateway.upstream.mark_broken
    supervisor.on_up = lambda server: gateway.upstream.poke()
    ui = None
    if args.ui_port is not None:
        from shelfsight.ui.cli import start_beside

        try:
            from shelfsight.client.client import Connection
            from shelfsight.ui.cli import read_auth

            key = args.ui_api_key_file.read_text().strip() if args.ui_api_key_file else None
            to_gateway = Connection(ports.local(gateway.port), tls_ca=args.ui_tls_ca or args.tls_cert, api_key=key) \
                if args.tls_cert else Connection(ports.local(gateway.port), api_key=key)
            ui = await asyncio.to_thread(start_beside, to_gateway, args.ui_port, args.host, None,
                                         read_auth(args.ui_auth_file))
        except BaseException:
            await gateway.stop()
            await asyncio.to_thread(triton.stop)
            raise
    http = (f"OpenAI HTTP http://{settings.host}:{gateway.http_port}/v1" if gateway.http_port else
            "OpenAI HTTP off (--http-port PORT turns it on)")
    print(f"serving: gateway {settings.host}:{gateway.port}, {http}, gateway metrics "
          f"http://{settings.metrics_host}:{gateway.metrics_port}/metrics; {triton.addresses()}"
          + (f"; catalog postgres 127.0.0.1:{catalog.port} (data {catalog.data_dir})" if catalog else "")
          + (f"; web UI {ui.local_url}" if ui else ""), flush=True)
    # drain 0: Triton is stopped after the gateway, which gave in-flight requests its shutdown grace
    # and ended the rest; what Triton still decodes then has nobody waiting for it
    watch = asyncio.create_task(supervisor.run(triton_stop, drain=0))
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
    if catalog:
        catalog_stop.set()
        await catalog_watch
        await asyncio.to_thread(catalog.stop)
    return rc or triton_exit(supervisor)


def start_catalog(args, repo: Path):
    """The embedded catalog server, when this repository serves an embedding model and no external
    catalog (--catalog URL) is given; else None."""
    from shelfsight.serving import manifest

    if args.catalog or manifest.load(repo).embedding is None:
        return None
    from shelfsight.catalog.postgres import EmbeddedPostgres, PostgresSettings, default_data_dir

    folder = args.catalog_dir or default_data_dir()
    if os.geteuid() == 0 and args.catalog_dir is None:
        folder.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    return EmbeddedPostgres(PostgresSettings(folder)).start()


def triton_exit(supervisor) -> int:
    """0 when the last tritonserver stopped cleanly, else 1 (and why, from its log)."""
    if supervisor.exit_code in (0, None):
        return 0
    print(f"tritonserver exited with code {supervisor.exit_code}:\n{supervisor.server.log_tail(10)}",
          file=sys.stderr, flush=True)
    return 1


def cmd_triton(args) -> int:
    from shelfsight.serving.supervisor import RestartPolicy, Supervisor

    configure_logging()
    supervisor = Supervisor(triton_settings(args, args.repo, args.host), RestartPolicy(max_failures=args.max_restarts))

    async def watch() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # before anything starts: a signal never kills us half-way
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        server = await asyncio.to_thread(supervisor.start)
        print(f"tritonserver ready: {server.addresses()}; shm prefix {server.shm_prefix};", flush=True)
        await supervisor.run(stop)

    asyncio.run(watch())  # giving up raises Unavailable: exit code 1
    rc = triton_exit(supervisor)
    print(f"tritonserver stopped (exit code {supervisor.exit_code})", flush=True)
    return rc
