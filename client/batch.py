"""`shelfsight batch DIR --out results.jsonl`: ask one question about every image in a folder.

Nothing accepted is lost and nothing is answered twice: each answer is appended (and flushed to disk)
the moment it arrives; a rerun reads the file, drops a line cut short by a crash, and asks only about
images that have no answer yet. Failures of the latest run are listed in `<out>.errors.jsonl` and are
retried on the next run.
Transient refusals (RESOURCE_EXHAUSTED, UNAVAILABLE) are retried with backoff within a run.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

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


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def answered(out: Path, question: str) -> set[str]:
    """Images already answered for `question`; a torn last line (crash mid-write) is cut off."""
    if not out.exists():
        return set()
    done, good_bytes = set(), 0
    with open(out, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                row = json.loads(raw)
            except ValueError:
                break
            good_bytes += len(raw)
            if row.get("question") == question:
                done.add(row["image"])
    if good_bytes != out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(good_bytes)
    return done


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
              progress: bool = True, retries: int = 3, timeout: float | None = None, **request) -> Summary:
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise errors.NotFound(f"image folder {folder} does not exist")
    if concurrency < 1:
        raise errors.InvalidArgument("--concurrency must be at least 1")
    every = images_in(folder)
    done = answered(out, question)
    todo = [p for p in every if p.relative_to(folder).as_posix() not in done]
    summary = Summary(total=len(every), skipped=len(every) - len(todo), answered=0, failed=0)
    # failures are retried on every run, so their file describes the latest run only
    results, failures = Appender(out), Appender(out.with_name(out.stem + ".errors.jsonl"), mode="w")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(every), initial=summary.skipped, unit="img", desc="batch")
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)

    async def worker(client: AsyncShelfsightClient):
        while not queue.empty():
            path = queue.get_nowait()
            name = path.relative_to(folder).as_posix()
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
