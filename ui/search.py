"""The Search tab's logic, without Gradio: a photo and/or words -> the catalog's hits as thumbnails with
their scores and metadata, and a line about the index (how many items, which model, what dimension).
The tab is a client of the gateway's Catalog service, like `shelfsight search`."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

from shelfsight import errors
from shelfsight.client.catalog import SearchResult
from shelfsight.client.cli import parse_filter
from shelfsight.client.client import ShelfsightClient

COLUMNS = ["rank", "id", "score", "vector", "text match", "rerank", "text", "metadata"]


@dataclass(frozen=True)
class Found:
    gallery: list  # (PIL image or None, caption) per hit, best first
    rows: list[list]  # COLUMNS per hit
    meta: str  # Markdown: hits, cache, time, model


def parse_filters(text: str) -> dict:
    """'brand=Acme, in_stock=true' -> {"brand": "Acme", "in_stock": True}; an error names the bad part."""
    parts = [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]
    return dict(parse_filter(p) for p in parts)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def present(r: SearchResult) -> Found:
    from PIL import Image

    gallery, rows = [], []
    for rank, h in enumerate(r.hits, 1):
        picture = Image.open(io.BytesIO(h.thumbnail)) if h.thumbnail else None
        caption = f"{rank}. {h.id} · {h.score:.3f}" + (f" · {h.text[:40]}" if h.text else "")
        if picture is not None:
            gallery.append((picture, caption))
        rows.append([rank, h.id, _fmt(h.score), _fmt(h.vector_score), _fmt(h.text_score), _fmt(h.rerank_score),
                     h.text, json.dumps(h.metadata, ensure_ascii=False)])
    meta = (f"{len(r.hits)} hits · {r.cache_status} · {r.total_seconds * 1000:.0f} ms · embedding model "
            f"`{r.model_id}`") if r.hits else f"no items found · {r.total_seconds * 1000:.0f} ms"
    return Found(gallery, rows, meta)


def search(target: str, photo: bytes | None, text: str, top_k: int, filters: str, rerank: int,
           timeout: float | None = None) -> Found:
    if not photo and not (text or "").strip():
        raise errors.InvalidArgument("give a photo, some words, or both to search by")
    with ShelfsightClient(target) as client:
        r = client.search(photo or None, text or "", top_k=int(top_k or 0), filters=parse_filters(filters),
                          rerank=int(rerank or 0), thumbnails=True, timeout=timeout)
    return present(r)


def index_line(target: str, timeout: float | None = None) -> str:
    """What the catalog holds, or why it cannot say."""
    try:
        with ShelfsightClient(target) as client:
            info = client.catalog_info(timeout=timeout)
    except errors.ShelfsightError as e:
        return f"The catalog cannot be searched right now: {e.message}"
    rerank = f", reranker `{info.reranker_model_id}`" if info.reranker_model_id else ", no reranker"
    return (f"Catalog **{info.name}**: {info.items} items, embedded by `{info.model_id}` "
            f"({info.dimensions} dimensions){rerank}")
