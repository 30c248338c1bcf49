"""What every `shelfsight` subcommand shares: the argument parser class and the one place that turns
typed errors into a line on stderr with exit code 2 (caller's mistake) or 1 (ours). The commands
themselves belong to the parts; app/cli.py puts them together."""
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


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, call the chosen subcommand's `func`, and map what it raises to an exit code."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ShelfsightError as e:
        print(f"shelfsight: error: {e}", file=sys.stderr)
        return 2 if e.code in CALLER_ERRORS else 1
    except KeyboardInterrupt:
        print("shelfsight: interrupted", file=sys.stderr)
        return 130
