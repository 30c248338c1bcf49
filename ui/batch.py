"""The Batch tab's logic, free of Gradio: stage uploaded photos (or zips) in a folder, ask about them
with `shelfsight batch`'s own resumable code (client/batch.py ask_all), and read its results file as
it grows, so the page's table fills as answers arrive.

Asking again in the same batch resumes: answered photos are not asked twice, failed ones are retried.
"""
from __future__ import annotations

import asyncio
import csv
import json
import shutil
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import Awaitable, Callable

from shelfsight import errors
from shelfsight.client.batch import IMAGE_SUFFIXES, answered, ask_all, errors_path

RESULTS = "results.jsonl"
COLUMNS = ["image", "answer", "cache", "tokens", "seconds", "error"]
CSV_FIELDS = ["image", "question", "text", "cache_status", "prompt_tokens", "completion_tokens", "finish_reason",
              "seconds", "model_id", "error", "message"]
MAX_ZIP_BYTES = 2 << 30  # uncompressed; a zip bomb is refused before it fills the disk


class Background:
    """Runs one coroutine to completion on its own thread and event loop; the page polls it."""

    def __init__(self, make: Callable[[], Awaitable]):
        self.error: BaseException | None = None
        self.value = None
        self._thread = threading.Thread(target=self._main, args=(make,), daemon=True)
        self._thread.start()

    def _main(self, make) -> None:
        try:
            self.value = asyncio.run(make())
        except BaseException as e:  # noqa: BLE001 - handed to the page, which words it
            self.error = e

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)


def _unique(folder: Path, name: str) -> Path:
    """folder/name, or folder/name-2.ext ... if two uploads share a name."""
    path, n = folder / name, 1
    while path.exists():
        n += 1
        path = folder / f"{PurePosixPath(name).stem}-{n}{PurePosixPath(name).suffix}"
    return path


def _from_zip(archive: Path, folder: Path, skipped: list[str]) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise errors.InvalidArgument(f"{archive.name} unpacks to more than {MAX_ZIP_BYTES >> 30} GiB")
            for m in members:
                # names are flattened to their parts below the zip's root: no "..", no absolute paths
                parts = [p for p in PurePosixPath(m.filename).parts if p not in ("", "/", "..", ".")]
                if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                    continue
                if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append(f"{archive.name}/{m.filename}")
                    continue
                target = _unique(folder, "__".join(parts))
                with z.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise errors.InvalidArgument(f"{archive.name} is not a readable zip file") from None


def stage(uploads: list[str], folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Copy uploaded photos and unpack uploaded zips into `folder`. Returns the (name, path) items to
    ask about, sorted, and the names of uploaded files that are not photos (left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    for upload in uploads or []:
        src = Path(upload)
        if src.suffix.lower() == ".zip":
            _from_zip(src, folder, skipped)
        elif src.suffix.lower() in IMAGE_SUFFIXES:
            shutil.copyfile(src, _unique(folder, src.name))
        else:
            skipped.append(src.name)
    items = sorted((p.name, p) for p in folder.iterdir() if p.is_file())
    if not items:
        raise errors.InvalidArgument("no photos to ask about: upload JPEG, PNG, WebP, BMP or GIF files, or a zip of "
                                     "them" + (f" (left out: {', '.join(skipped[:5])})" if skipped else ""))
    return items, skipped


def start(target: str, items: list[tuple[str, Path]], out: Path, question: str, concurrency: int = 4,
          timeout: float | None = None, **request) -> Background:
    return Background(lambda: ask_all(target, items, out, question, concurrency=concurrency, progress=False,
                                      timeout=timeout, **request))


def read_rows(out: Path, question: str) -> tuple[list[dict], list[dict]]:
    """(answers, failures) recorded so far for `question`: whole lines only (one may be mid-write)."""
    def lines(path: Path) -> list[dict]:
        if not path.exists():
            return []
        rows = []
        for raw in path.read_bytes().splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            row = json.loads(raw)
            if row.get("question") == question:
                rows.append(row)
        return rows
    return lines(out), lines(errors_path(out))


def table(items: list[tuple[str, Path]], results: list[dict], failures: list[dict]) -> list[list]:
    """One row per photo in upload order: its answer, or its error, or blank while it waits."""
    by_name = {r["image"]: r for r in results}
    failed = {r["image"]: r for r in failures if r["image"] not in by_name}
    rows = []
    for name, _ in items:
        if name in by_name:
            r = by_name[name]
            rows.append([name, r["text"], r["cache_status"], r["completion_tokens"], round(r["seconds"], 2), ""])
        elif name in failed:
            rows.append([name, "", "", "", "", f"{failed[name]['error']}: {failed[name]['message']}"])
        else:
            rows.append([name, "", "", "", "", ""])
    return rows


def pending(out: Path, items: list[tuple[str, Path]], question: str) -> int:
    """Photos in this batch with no answer yet (what the next run will ask)."""
    done = answered(out, question)
    return sum(1 for name, _ in items if name not in done)


def export(results: list[dict], failures: list[dict], out: Path) -> tuple[Path, Path]:
    """<out>.csv and <out>.jsonl (answers then failures, one row per photo) for download."""
    rows = results + [f for f in failures if f["image"] not in {r["image"] for r in results}]
    csv_path, jsonl_path = out.with_suffix(".csv"), out.with_name(out.stem + "-all.jsonl")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(jsonl_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return csv_path, jsonl_path
