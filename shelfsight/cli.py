"""The `shelfsight` command. Each part registers its own subcommands; this file only dispatches and
turns typed errors into one line on stderr with exit code 2 (caller's mistake) or 1 (ours)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shelfsight.errors import ShelfsightError

# Errors that mean "the caller asked for something wrong": exit 2, like a usage error.
CALLER_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE"}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from shelfsight.client import cli as client_cli
    from shelfsight.evaluation import cli as evaluation_cli
    from shelfsight.export import cli as export_cli
    from shelfsight.gateway import cli as gateway_cli
    from shelfsight.loadtest import cli as loadtest_cli
    from shelfsight.ui import cli as ui_cli

    parser = Parser(prog="shelfsight", description="Serve Qwen3-VL for e-commerce product recognition: "
                    "export and quantize checkpoints, run Triton and the caching gRPC gateway, ask questions.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    export_cli.register(sub)
    register_triton(sub)
    gateway_cli.register(sub)
    client_cli.register(sub)
    loadtest_cli.register(sub)
    evaluation_cli.register(sub)
    ui_cli.register(sub)
    return parser


def register_triton(sub) -> None:
    from shelfsight.gateway.cli import add_triton_flags

    t = sub.add_parser("triton", help="run the bundled tritonserver on a repository until Ctrl-C/SIGTERM, "
                       "restarting it when it or a model process dies")
    t.add_argument("--repo", required=True, type=Path)
    t.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    add_triton_flags(t)
    t.set_defaults(func=cmd_triton)


def cmd_triton(args) -> int:
    import asyncio
    import logging
    import signal

    from shelfsight.gateway.cli import triton_exit, triton_settings
    from shelfsight.supervisor import RestartPolicy, Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ShelfsightError as e:
        print(f"shelfsight: error: {e}", file=sys.stderr)
        return 2 if e.code in CALLER_ERRORS else 1
    except KeyboardInterrupt:
        print("shelfsight: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
