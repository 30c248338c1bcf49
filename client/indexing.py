"""`shelfsight index CATALOG`: put a catalog into the gateway's search index, resumably.

CATALOG is a folder of photos (each file's stem is its id) or a JSONL file of items: `id`, `image` (a
path, relative to the file's folder), `text`, and any other keys as metadata. Items stream to the
gateway's `Catalog.Index`; each acknowledgement (stored, or unchanged) is appended to a progress file and
flushed before the next is read, so an interrupted run continues where it stopped: a rerun sends only
items not acknowledged with the same content (and the gateway itself skips an item whose content it
already holds). Failed items are listed in `<progress>.errors.jsonl` (the latest run) and sent again
next time. A gateway or catalog that goes away mid-run (UNAVAILABLE) is retried with backoff.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from shelfsight import errors
from shelfsight.client.batch import IMAGE_SUFFIXES, Appender, describe_unsupported, journal, scan
from shelfsight.client.catalog import CatalogItem
from shelfsight.client.client import AsyncShelfsightClient

TRANSIENT = (errors.Unavailable, errors.ResourceExhausted, errors.DeadlineExceeded)


@dataclass
class Summary:
    total: int
    skipped: int  # acknowledged by an earlier run with the same content
    indexed: int = 0
    unchanged: int = 0
    failed: int = 0
    unsupported: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    id: str
    image: Path | None
    text: str
    metadata: dict

    def digest(self) -> str:
        h = hashlib.sha256()
        if self.image is not None:
            h.update(self.image.read_bytes())
        h.update(json.dumps([self.text, self.metadata], sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()


def read_catalog(catalog: Path) -> tuple[list[Source], list[str]]:
    """(items, names of files left out) of a folder of photos or a JSONL file; errors name the line."""
    if catalog.is_dir():
        photos, others = scan(catalog)
        seen: dict[str, Path] = {}
        for p in photos:
            if p.stem in seen:
                raise errors.InvalidArgument(f"{p} and {seen[p.stem]} would both be item {p.stem!r}: ids are file stems")
            seen[p.stem] = p
        return [Source(p.stem, p, "", {}) for p in photos], [p.relative_to(catalog).as_posix() for p in others]
    if not catalog.is_file():
        raise errors.NotFound(f"catalog {catalog} does not exist")
    out, ids = [], set()
    for n, line in enumerate(catalog.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{catalog}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise errors.InvalidArgument(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise errors.InvalidArgument(f"{where}: each line must be an object with a string `id`")
        if row["id"] in ids:
            raise errors.InvalidArgument(f"{where}: id {row['id']!r} appears twice")
        ids.add(row["id"])
        image = row.pop("image", None)
        path = (catalog.parent / image) if image else None
        if path is not None and not path.is_file():
            raise errors.InvalidArgument(f"{where}: image {image!r} is not a file")
        if path is not None and path.suffix.lower() not in IMAGE_SUFFIXES:
            raise errors.InvalidArgument(f"{where}: image {image!r} is not {'/'.join(IMAGE_SUFFIXES)}")
        text = row.pop("text", "")
        out.append(Source(row.pop("id"), path, text if isinstance(text, str) else str(text), row))
    return out, []


def progress_path(catalog: Path) -> Path:
    return catalog.with_name(catalog.name + ".index.jsonl")


def acknowledged(progress: Path) -> dict[str, str]:
    """{id: digest} acknowledged by earlier runs (later lines win; journal: a torn last line is cut off)."""
    return {row["id"]: row["digest"] for row in journal(progress)}


async def run(target: str, catalog: Path, progress: Path | None = None, retries: int = 5,
              timeout: float | None = None, log=None) -> Summary:
    catalog = Path(catalog)
    sources, unsupported = read_catalog(catalog)
    progress = Path(progress) if progress else progress_path(catalog)
    if unsupported and log:
        log(describe_unsupported(unsupported))
    done = acknowledged(progress)
    digests = {s.id: s.digest() for s in sources}
    todo = [s for s in sources if done.get(s.id) != digests[s.id]]
    summary = Summary(total=len(sources), skipped=len(sources) - len(todo), unsupported=unsupported)
    acks, failures = Appender(progress), Appender(progress.with_name(progress.stem + ".errors.jsonl"), mode="w")
    try:
        async with AsyncShelfsightClient(target) as client:
            for attempt in range(retries + 1):
                try:
                    await _stream(client, todo, digests, acks, failures, summary, timeout)
                    break
                except TRANSIENT as e:
                    if attempt == retries:
                        raise
                    if log:
                        log(f"{e.code}: {e.message}; retrying the {len(todo)} items not acknowledged")
                    await asyncio.sleep(min(10.0, 0.5 * 2 ** attempt))
    finally:
        acks.close()
        failures.close()
    return summary


async def _stream(client, todo: list[Source], digests, acks: Appender, failures: Appender, summary: Summary,
                  timeout) -> None:
    """One Index stream over `todo`; each acknowledged item leaves `todo` (a retry sends only the rest)."""
    def items():
        for s in list(todo):
            yield CatalogItem(s.id, s.image.read_bytes() if s.image else None, s.text, s.metadata)

    by_id = {s.id: s for s in todo}
    async for r in client.index(items(), timeout=timeout):
        source = by_id.get(r.id)
        if r.status == "failed":
            failures.write({"id": r.id, "error": r.code, "message": r.error})
            summary.failed += 1
        else:
            acks.write({"id": r.id, "digest": digests[r.id], "status": r.status})
            setattr(summary, r.status, getattr(summary, r.status) + 1)
        if source is not None:
            todo.remove(source)
