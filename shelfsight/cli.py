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

    parser = Parser(prog="shelfsight", description="Serve Qwen3-VL for e-commerce product recognition: "
                    "export and quantize checkpoints, run Triton and the caching gRPC gateway, ask questions.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    export_cli.register(sub)
    register_triton(sub)
    gateway_cli.register(sub)
    client_cli.register(sub)
    loadtest_cli.register(sub)
    evaluation_cli.register(sub)
    return parser


def register_triton(sub) -> None:
    t = sub.add_parser("triton", help="run the bundled tritonserver on a repository until Ctrl-C/SIGTERM")
    t.add_argument("--repo", required=True, type=Path)
    t.add_argument("--grpc-port", type=int, default=8001)
    t.add_argument("--http-port", type=int, default=8000)
    t.add_argument("--metrics-port", type=int, default=8002)
    t.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    t.set_defaults(func=cmd_triton)


def cmd_triton(args) -> int:
    import signal
    import threading

    from shelfsight.tritonserver import TritonServer, TritonSettings

    server = TritonServer(TritonSettings(repo=args.repo, grpc_port=args.grpc_port, http_port=args.http_port,
                                         metrics_port=args.metrics_port, host=args.host))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"tritonserver ready: grpc {server.grpc_url}, metrics {server.metrics_url}; "
          f"shm prefix {server.shm_prefix}; log {server.log_path}", flush=True)
    while not stop.is_set():
        if server.proc.poll() is not None:
            print(f"tritonserver exited ({server.proc.returncode}):\n{server.log_tail()}", file=sys.stderr)
            return 1
        stop.wait(0.5)
    rc = server.stop()
    print(f"tritonserver stopped (exit code {rc})", flush=True)
    return 0


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
