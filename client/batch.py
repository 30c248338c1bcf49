"""`shelfsight batch DIR --out results.jsonl`: ask one question about every image in a folder.

Nothing accepted is lost and nothing is answered twice: each answer is appended (and flushed to disk)
the moment it arrives; a rerun reads the file, drops a line cut short by a crash, and asks only about
images that have no answer yet. Files of other types are not asked about, but are counted and named
(Summary.unsupported; the command line says so on stderr before asking). Failures of the latest run
are listed in `<out>.errors.jsonl` and are retried on the next run.
Transient refusals (RESOURCE_EXHAUSTED, UNAVAILABLE) are retried with backoff within a run.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from shelfsight import errors
from shelfsight.client.client import AsyncShelfsightClient

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TRANSIENT = (errors.ResourceExhausted, errors.Unavailable)
DEFAULT_QUESTION = "Describe this product: category, brand, colour and size."


@dataclass
class Summary:
    total: int
    skipped: int  # answered by an earlier run
    answered: int
    failed: int
    unsupported: list[str] = field(default_factory=list)  # files not asked about: not an image type


def scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, files of any other type) under `folder`, recursively, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def describe_unsupported(names: list[str], shown: int = 10) -> str:
    """One line: how many files were left out and which (the first `shown` of them)."""
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return (f"{len(names)} file{'s' if len(names) != 1 else ''} not asked about "
            f"(not {'/'.join(IMAGE_SUFFIXES)}): {listed}")


def journal(path: Path) -> Iterator[dict]:
    """The rows of a JSONL journal in order; a torn last line (a crash mid-write) is cut off the file
    once the rows are read, so that the next append starts on a line of its own."""
    if not path.exists():
        return
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                row = json.loads(raw)
            except ValueError:
                break
            good_bytes += len(raw)
            yield row
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)


def answered(out: Path, question: str) -> set[str]:
    """Images already answered for `question` (journal: a torn last line is cut off)."""
    return {row["image"] for row in journal(out) if row.get("question") == question}


def errors_path(out: Path) -> Path:
    return out.with_name(out.stem + ".errors.jsonl")


class Appender:
    """One JSON object per line, durable before the next is taken."""

    def __init__(self, path: Path, mode: str = "a"):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, mode, encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


async def run(target: str, folder: Path, out: Path, question: str = DEFAULT_QUESTION, concurrency: int = 4,
              progress: bool = True, retries: int = 3, timeout: float | None = None, log=None,
              **request) -> Summary:
    """Every image under `folder` (recursively), named by its path relative to the folder; `log`, if
    given, hears which other files are left out before any question is asked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise errors.NotFound(f"image folder {folder} does not exist")
    images, others = scan(folder)
    out = Path(out)
    ours = {out.resolve(), errors_path(out).resolve()}  # --out may sit inside the folder
    unsupported = [p.relative_to(folder).as_posix() for p in others if p.resolve() not in ours]
    if not images:
        raise errors.InvalidArgument(f"image folder {folder} holds no image files"
                                     + (f"; {describe_unsupported(unsupported)}" if unsupported else ""))
    if unsupported and log:
        log(describe_unsupported(unsupported))
    items = [(p.relative_to(folder).as_posix(), p) for p in images]
    summary = await ask_all(target, items, out, question, concurrency, progress, retries, timeout, **request)
    summary.unsupported = unsupported
    return summary


async def ask_all(target: str, items: list[tuple[str, Path]], out: Path, question: str, concurrency: int = 4,
                  progress: bool = True, retries: int = 3, timeout: float | None = None, **request) -> Summary:
    """Ask `question` about each (name, path) not yet answered in `out`; see the module docstring."""
    out = Path(out)
    if concurrency < 1:
        raise errors.InvalidArgument("--concurrency must be at least 1")
    done = answered(out, question)
    todo = [(name, path) for name, path in items if name not in done]
    summary = Summary(total=len(items), skipped=len(items) - len(todo), answered=0, failed=0)
    # failures are retried on every run, so their file describes the latest run only
    results, failures = Appender(out), Appender(errors_path(out), mode="w")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=summary.skipped, unit="img", desc="asking")
    queue: asyncio.Queue[tuple[str, Path]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    async def worker(client: AsyncShelfsightClient):
        while not queue.empty():
            name, path = queue.get_nowait()
            t0 = time.perf_counter()
            for attempt in range(retries + 1):
                try:
                    r = await client.recognize(path.read_bytes(), question, timeout=timeout, **request)
                    results.write({"image": name, "question": question, **r.to_dict(),
                                   "seconds": round(time.perf_counter() - t0, 4)})
                    summary.answered += 1
                    break
                except TRANSIENT as e:
                    if attempt == retries:
                        failures.write({"image": name, "question": question, "error": e.code, "message": e.message})
                        summary.failed += 1
                    else:
                        await asyncio.sleep(0.5 * 2 ** attempt)
                except errors.ShelfsightError as e:
                    failures.write({"image": name, "question": question, "error": e.code, "message": e.message})
                    summary.failed += 1
                    break
            if bar:
                bar.update(1)

    try:
        async with AsyncShelfsightClient(target) as client:
            await asyncio.gather(*[worker(client) for _ in range(min(concurrency, max(1, len(todo))))])
    finally:
        results.close()
        failures.close()
        if bar:
            bar.close()
    return summary
