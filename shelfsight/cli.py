"""The `shelfsight` command. Each part registers its own subcommands; this file only dispatches and
turns typed errors into one line on stderr with exit code 2 (caller's mistake) or 1 (ours)."""
from __future__ import annotations

import argparse
import sys

from shelfsight.errors import ShelfsightError

# Errors that mean "the caller asked for something wrong": exit 2, like a usage error.
CALLER_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE"}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from shelfsight.export import cli as export_cli

    parser = Parser(prog="shelfsight", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    export_cli.register(sub)
    return parser


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
