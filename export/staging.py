"""Output that appears whole or not at all: written into a hidden sibling folder, renamed into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shelfsight.errors import AlreadyExists, InvalidArgument


class Staging:
    """A hidden sibling folder of `out` that becomes `out` on commit() and vanishes on discard().
    Use as a context manager: an exception (or Ctrl-C) discards."""

    def __init__(self, out: Path, force: bool):
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InvalidArgument(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise AlreadyExists(f"--out {out} exists and is not empty; pass --force to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.path.rename(self.out)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
