"""Catalog search, the transport-neutral core: index items, delete them, search them (docs/search.md).

Faces (gateway/catalog_grpc.py for gRPC) parse their wire format into the dataclasses below and format
what comes back; everything else is here: checks, the embedding and reranking calls to Triton (through
the gateway's replicas, so their health and metrics are the answers'), the catalog (catalog/store.py:
PostgreSQL + pgvector), result caching and coalescing, metrics.

    index   items in order -> checked -> unchanged ones skipped (content hash) -> embedded (photo + text,
            the model's default instruction) and thumbnailed -> stored, one transaction per batch ->
            one outcome per item, in order, once stored. A bad item fails alone.
    search  the query embedded (photo and/or text, with a retrieval instruction) -> nearest items, fused
            with full-text matches when there is text -> optionally the first N reranked -> hits.
            Cached under the exact query, the models and the catalog's version (every write bumps it).

The catalog is opened on first use with the embedding model the replicas serve (its id and size are
recorded in the catalog; another model is refused). A catalog that cannot be reached makes Search,
Index, Delete and Info UNAVAILABLE and health "shelfsight.v1.Catalog" NOT_SERVING; answering
questions (ProductVision) does not depend on it.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from shelfsight import params
from shelfsight.catalog.store import CatalogSettings, CatalogStore, Item as StoredItem
from shelfsight.errors import FailedPrecondition, InvalidArgument, ShelfsightError, Unavailable
from shelfsight.gateway.auth import CLIENT
from shelfsight.gateway.cache import normalize
from shelfsight.gateway.flights import Flights
from shelfsight.gateway.likeness import decode_picture
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.replicas import Replicas
from shelfsight.gateway.settings import GatewaySettings
from shelfsight.gateway.tasks import Background
from shelfsight.model import imaging
from shelfsight.serving import contract
from shelfsight.serving.pipeline import Item

log = logging.getLogger("shelfsight.gateway.search")
POLICIES = ("use", "skip", "refresh")
LINGER = 0.005  # seconds an Index batch waits for more items before it is processed


@dataclass(frozen=True)
class IndexEntry:
    id: str
    image: bytes = b""
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    error: ShelfsightError | None = None  # the face could not read the item (a malformed message)


@dataclass(frozen=True)
class IndexOutcome:
    id: str
    status: str  # indexed | unchanged | failed
    error: ShelfsightError | None = None


@dataclass(frozen=True)
class SearchQuery:
    image: bytes = b""
    text: str = ""
    top_k: int = 0  # 0: the default
    filters: dict[str, Any] = field(default_factory=dict)
    rerank: int = 0
    policy: str = "use"
    thumbnails: bool = False


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    vector_score: float | None
    text_score: float | None
    rerank_score: float | None
    text: str
    metadata: dict[str, Any]
    thumbnail: bytes = b""


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    model_id: str
    cache: str  # miss | exact | coalesced
    seconds: dict[str, float]  # embed, catalog, rerank: where the time went (0 for a cache hit)


@dataclass(frozen=True)
class CatalogInfo:
    model_id: str
    dimensions: int
    items: int
    reranker_model_id: str
    name: str


def check_entry(e: IndexEntry, limits: params.Limits, image_limits: imaging.ImageLimits) -> imaging.Encoded | None:
    """An item's own checks (the catalog checks id length and metadata again); the photo's header."""
    if e.error is not None:
        raise e.error
    if not e.id or len(e.id) > 256:
        raise InvalidArgument(f"id must be 1-256 characters, got {len(e.id)}")
    params.check_text("text", e.text, limits.max_question_chars, required=False)
    if not e.image and not e.text.strip():
        raise InvalidArgument("an item needs a photo (image) or text")
    return imaging.check_encoded(e.image, image_limits) if e.image else None


def check_query(q: SearchQuery, s, limits: params.Limits, image_limits: imaging.ImageLimits) -> SearchQuery:
    params.check_text("text", q.text, limits.max_question_chars, required=False)
    if not q.image and not q.text.strip():
        raise InvalidArgument("a search needs a photo (image), text, or both")
    if q.image:
        imaging.check_encoded(q.image, image_limits)
    top_k = q.top_k or s.top_k
    if not 1 <= top_k <= s.max_top_k:
        raise InvalidArgument(f"top_k must be between 1 and {s.max_top_k}, got {q.top_k}")
    if not 0 <= q.rerank <= s.max_rerank:
        raise InvalidArgument(f"rerank must be between 0 (off) and {s.max_rerank}, got {q.rerank}")
    if q.policy not in POLICIES:
        raise InvalidArgument(f"cache_policy must be one of {', '.join(POLICIES)}, got {q.policy!r}")
    return dataclasses.replace(q, top_k=top_k)


def content_hash(e: IndexEntry, model_id: str, dims: int) -> str:
    """What makes an item's stored row: same hash, nothing to do when it is indexed again."""
    doc = json.dumps({"image": hashlib.sha256(e.image).hexdigest(), "text": e.text, "metadata": e.metadata,
                      "model": model_id, "dims": dims}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(doc.encode()).hexdigest()


def make_thumbnail(image: bytes, encoded: imaging.Encoded, side: int) -> bytes:
    picture = decode_picture(image, max_pixels=encoded.pixels)
    picture.thumbnail((side, side))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()


class SearchService:
    def __init__(self, settings: GatewaySettings, upstream: Replicas, cache_store, metrics: GatewayMetrics,
                 on_health: Callable[[bool], None] = lambda up: None):
        self.settings, self.s = settings, settings.search
        self.upstream, self.cache_store, self.metrics, self.on_health = upstream, cache_store, metrics, on_health
        self.flights = Flights(settings.max_in_flight)
        self._store: CatalogStore | None = None
        self._opened_for: tuple[str, int] | None = None
        self._lock = asyncio.Lock()
        self._tasks = Background()
        self.up: bool | None = None

    # ---- the catalog, opened for the embedding model the replicas serve ----
    def _embedding_model(self) -> tuple[str, int]:
        _, info = self.upstream.serving(contract.EMBED)
        return info["model_id"], int(info["dimensions"])

    async def _catalog(self) -> tuple[CatalogStore, str, int]:
        model_id, dims = self._embedding_model()
        if not self.s.catalog_url:
            raise FailedPrecondition("no catalog is configured: give the gateway --catalog postgresql://... "
                                     "(`shelfsight serve` starts one of its own)")
        if self._store is None or self._opened_for != (model_id, dims):
            async with self._lock:
                if self._store is None or self._opened_for != (model_id, dims):
                    if self._store is not None:
                        await self._store.close()
                        self._store = None
                    store = CatalogStore(CatalogSettings(self.s.catalog_url, self.s.catalog_name,
                                                         timeout=self.s.catalog_timeout))
                    await store.open(model_id, dims)
                    self._store, self._opened_for = store, (model_id, dims)
        return self._store, model_id, dims

    def _limits(self):
        info = self.upstream.model()
        return info.limits, info.image_limits

    async def _embed(self, items: list[Item], instruction: str, dims: int, timeout: float):
        replica, _ = self.upstream.serving(contract.EMBED)
        t0 = time.perf_counter()
        try:
            return await self.upstream.call(replica, replica.client.embed(items, instruction=instruction,
                                                                          dimensions=dims, timeout=timeout))
        finally:
            self.metrics.search_seconds.labels("embed").observe(time.perf_counter() - t0)

    async def embed(self, items: list[Item], instruction: str, dimensions: int, timeout: float):
        """Embeddings of `items` by the served embedding model (no catalog involved): (model id, list of
        pipeline.Embedding). `dimensions` 0: the served default size."""
        limits, image_limits = self._limits()
        for i, item in enumerate(items):
            params.check_text(f"input[{i}]", item.text, limits.max_question_chars, required=False)
            for picture in item.pictures:
                imaging.check_encoded(picture, image_limits)
        _, info = self.upstream.serving(contract.EMBED)
        dims = dimensions or int(info["dimensions"])
        if not 1 <= dims <= int(info.get("width", dims)):
            raise InvalidArgument(f"dimensions must be between 1 and {info.get('width')}, got {dimensions}")
        return info["model_id"], await self._embed(items, instruction, dims, timeout)

    # ---- index ----
    async def index(self, entries: AsyncIterator[IndexEntry], timeout: float) -> AsyncIterator[IndexOutcome]:
        """One outcome per entry, in order, each once its item is stored (or has failed). Items are taken
        in batches of what has arrived (at most index_batch items and index_batch_bytes of photos); an id
        seen twice ends a batch, so the later item is stored after the earlier."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.s.index_batch)
        end = object()

        async def read():
            async for e in entries:
                await queue.put(e)
            await queue.put(end)

        reader = asyncio.ensure_future(read())
        held, done = None, False
        try:
            while not done:
                batch, size = [], 0
                nxt = held if held is not None else await self._next(queue, reader, None)
                held = None
                while nxt is not end and nxt is not None:
                    if any(e.id == nxt.id for e in batch) or (batch and size + len(nxt.image) > self.s.index_batch_bytes):
                        held = nxt
                        break
                    batch.append(nxt)
                    size += len(nxt.image)
                    if len(batch) >= self.s.index_batch:
                        break
                    nxt = await self._next(queue, reader, LINGER)
                done = nxt is end
                async for outcome in self._index_batch(batch, timeout):
                    yield outcome
        finally:
            reader.cancel()

    @staticmethod
    async def _next(queue: asyncio.Queue, reader: asyncio.Future, wait: float | None):
        """The next entry (or the end marker); None when none arrives within `wait` seconds. The
        reader's failure (the client's stream broke) is raised here."""
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, reader}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()
        return None  # nothing within `wait` (a reader that ended has queued the end marker)

    async def _index_batch(self, batch: list[IndexEntry], timeout: float) -> AsyncIterator[IndexOutcome]:
        if not batch:
            return
        outcome: dict[int, IndexOutcome] = {}
        encoded: dict[int, imaging.Encoded | None] = {}
        limits, image_limits = self._limits()
        for i, e in enumerate(batch):
            try:
                encoded[i] = check_entry(e, limits, image_limits)
            except ShelfsightError as err:
                outcome[i] = IndexOutcome(e.id, "failed", err)
        store, model_id, dims = await self._catalog()
        valid = [i for i in range(len(batch)) if i not in outcome]
        hashes = {i: content_hash(batch[i], model_id, dims) for i in valid}
        stored = await store.hashes([batch[i].id for i in valid]) if valid else {}
        todo = []
        for i in valid:
            if stored.get(batch[i].id) == hashes[i]:
                outcome[i] = IndexOutcome(batch[i].id, "unchanged")
            else:
                todo.append(i)
        rows = await self._prepare([batch[i] for i in todo], [encoded[i] for i in todo], [hashes[i] for i in todo],
                                   dims, timeout)
        good = []
        for i, row in zip(todo, rows):
            if isinstance(row, ShelfsightError):
                outcome[i] = IndexOutcome(batch[i].id, "failed", row)
            else:
                good.append((i, row))
        await store.upsert([row for _, row in good])  # the catalog down: the stream ends UNAVAILABLE
        for i, _ in good:
            outcome[i] = IndexOutcome(batch[i].id, "indexed")
        for i in range(len(batch)):
            self.metrics.index_items.labels(outcome[i].status).inc()
            yield outcome[i]

    async def _prepare(self, entries, encoded, hashes, dims: int, timeout: float) -> list:
        """Each entry's stored row (embedding and thumbnail made concurrently), or its own error."""
        async def one(e: IndexEntry, enc, chash: str):
            try:
                thumb = b""
                if e.image:
                    try:
                        thumb = await asyncio.to_thread(make_thumbnail, e.image, enc, self.s.thumbnail_side)
                    except Exception as err:  # noqa: BLE001 - the header read, the picture did not
                        raise InvalidArgument(f"image could not be decoded: {err}") from None
                pictures = (e.image,) if e.image else ()
                (emb,) = await self._embed([Item(e.text, pictures)], "", dims, timeout)
                return StoredItem(e.id, e.text, e.metadata, emb.vector, chash, thumb)
            except ShelfsightError as err:
                if isinstance(err, Unavailable):
                    raise  # Triton down: the stream ends, nothing of this batch is acknowledged
                return err
        return list(await asyncio.gather(*(one(e, enc, h) for e, enc, h in zip(entries, encoded, hashes))))

    # ---- delete, info ----
    async def delete(self, ids: list[str]) -> int:
        store, _, _ = await self._catalog()
        return await store.delete(ids)

    async def info(self) -> CatalogInfo:
        store, model_id, dims = await self._catalog()
        items = await store.count()
        self.metrics.catalog_items.set(items)
        rerank = self._reranker_id()
        return CatalogInfo(model_id, dims, items, rerank, self.s.catalog_name)

    def _reranker_id(self) -> str:
        try:
            return self.upstream.serving(contract.RERANK)[1]["model_id"]
        except ShelfsightError:
            return ""

    # ---- search ----
    async def search(self, q: SearchQuery, timeout: float) -> SearchOutcome:
        limits, image_limits = self._limits()
        q = check_query(q, self.s, limits, image_limits)
        if q.rerank:
            self.upstream.serving(contract.RERANK)  # FAILED_PRECONDITION now, before any work
        store, model_id, dims = await self._catalog()
        key = self._key(q, model_id, dims, await store.version())
        cache = self.settings.cache.enabled and q.policy != "skip"
        if cache and q.policy == "use":
            raw = await self.cache_store.get(key)
            if raw is not None:
                hits = [Hit(**{**h, "thumbnail": base64.b64decode(h["thumbnail"])}) for h in json.loads(raw)]
                return SearchOutcome(hits, model_id, "exact", {})
        flight, coalesced = self.flights.join(key if q.policy == "use" else None,
                                              lambda f: self._run(f, q, store, model_id, dims, key, cache, timeout))
        try:
            hits, seconds = await flight.result()
        finally:
            self.flights.leave(flight)
        return SearchOutcome(hits, model_id, "coalesced" if coalesced else "miss", seconds)

    def _key(self, q: SearchQuery, model_id: str, dims: int, version: int) -> str:
        doc = {"image": hashlib.sha256(q.image).hexdigest(), "text": normalize(q.text), "top_k": q.top_k,
               "filters": q.filters, "rerank": q.rerank, "thumbnails": q.thumbnails, "model": model_id,
               "dims": dims, "reranker": self._reranker_id() if q.rerank else "", "version": version,
               "catalog": self.s.catalog_name, "instruction": self.s.query_instruction,
               "client": CLIENT.get() if self.settings.cache_scope == "client" else None}
        return "search:" + hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    async def _run(self, flight, q: SearchQuery, store: CatalogStore, model_id: str, dims: int, key: str,
                   cache: bool, timeout: float) -> None:
        seconds = {}
        query = Item(q.text, (q.image,) if q.image else ())
        t0 = time.perf_counter()
        (emb,) = await self._embed([query], self.s.query_instruction, dims, timeout)
        seconds["embed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = await store.search(vector=emb.vector, text=q.text if q.text.strip() else None,
                                   top_k=max(q.top_k, q.rerank), filters=q.filters or None,
                                   candidates=max(self.s.candidates, q.top_k, q.rerank))
        hits = [Hit(h.id, h.score, h.vector_score, h.text_score, None, h.text, h.metadata) for h in found]
        seconds["catalog"] = time.perf_counter() - t0
        self.metrics.search_seconds.labels("catalog").observe(seconds["catalog"])
        if q.rerank and hits:
            t0 = time.perf_counter()
            hits = await self._rerank(store, query, hits, q.rerank, timeout)
            seconds["rerank"] = time.perf_counter() - t0
            self.metrics.search_seconds.labels("rerank").observe(seconds["rerank"])
        hits = hits[:q.top_k]
        if q.thumbnails and hits:
            thumbs = await store.thumbnails([h.id for h in hits])
            hits = [dataclasses.replace(h, thumbnail=thumbs.get(h.id, b"")) for h in hits]
        if cache:
            value = json.dumps([dict(dataclasses.asdict(h), thumbnail=base64.b64encode(h.thumbnail).decode())
                                for h in hits]).encode()
            await self.cache_store.put(key, "search", None, value, self.settings.cache.ttl_seconds)
        await flight.finish((hits, seconds))

    async def _rerank(self, store: CatalogStore, query: Item, hits: list[Hit], n: int, timeout: float) -> list[Hit]:
        """The first n hits reordered by the reranker (the rest keep their order after them); each
        document is the item's text and its stored thumbnail."""
        head, tail = hits[:n], hits[n:]
        thumbs = await store.thumbnails([h.id for h in head])
        docs = [Item(h.text, (thumbs[h.id],) if h.id in thumbs else ()) for h in head]
        replica, _ = self.upstream.serving(contract.RERANK)
        scores = await self.upstream.call(replica, replica.client.rerank(query, docs, timeout=timeout))
        ranked = sorted((dataclasses.replace(h, rerank_score=s, score=s) for h, s in zip(head, scores)),
                        key=lambda h: -h.score)
        return ranked + tail

    # ---- health ----
    def start(self) -> None:
        if self.s.catalog_url:
            self._tasks.spawn(self._watch(), name="catalog health")

    async def _watch(self) -> None:
        while True:
            try:
                store, _, _ = await self._catalog()
                self.metrics.catalog_items.set(await store.count())
                up = True
            except ShelfsightError as e:
                up = False
                if self.up is not False:
                    log.warning("catalog search is not available: %s", e.message)
            if up != self.up:
                if up:
                    log.info("catalog search is available (%s)", self.s.catalog_name)
                self.up = up
                self.metrics.catalog_up.set(1 if up else 0)
                self.on_health(up)
            await asyncio.sleep(self.s.health_interval if up else min(0.5, self.s.health_interval))

    async def close(self) -> None:
        await self._tasks.close()
        if self._store is not None:
            await self._store.close()
