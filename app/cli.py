"""The `shelfsight` command: each part registers its own subcommands into one parser; running them
and turning typed errors into exit codes is shelfsight/command.py's."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from shelfsight.command import Parser, run

# modules with a register(subparsers) function, in the order `shelfsight --help` lists their commands
PARTS = ("shelfsight.export.cli", "shelfsight.app.serve", "shelfsight.gateway.cli", "shelfsight.client.cli",
         "shelfsight.loadtest.cli", "shelfsight.evaluation.cli", "shelfsight.ui.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="shelfsight", description="Serve Qwen3-VL for e-commerce product recognition: "
                    "export and quantize checkpoints, run Triton and the caching gRPC gateway, ask questions.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for part in PARTS:
        import_module(part).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
