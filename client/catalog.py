"""Catalog search from Python: the `shelfsight.v1.Catalog` service, sync and asyncio.

    from shelfsight.client import ShelfsightClient
    with ShelfsightClient("127.0.0.1:50051") as c:
        for r in c.index([CatalogItem("sku-1", image="mug.jpg", text="Blue mug 350 ml", metadata={"brand": "Acme"})]):
            print(r.id, r.status)
        for hit in c.search(image="photo.jpg", top_k=5).hits:
            print(hit.id, hit.score, hit.metadata)

The client classes take these methods from `CatalogCalls` / `AsyncCatalogCalls` (one channel for
answers and search). Failures raise the typed errors of shelfsight.errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator

import grpc

from shelfsight import errors
from shelfsight.protos import metadata_value, pb, python_value

POLICIES = {"use": pb.CACHE_POLICY_USE, "skip": pb.CACHE_POLICY_SKIP, "refresh": pb.CACHE_POLICY_REFRESH}
STATUS = {pb.INDEX_STATUS_INDEXED: "indexed", pb.INDEX_STATUS_UNCHANGED: "unchanged", pb.INDEX_STATUS_FAILED: "failed"}
CACHE = {pb.CACHE_STATUS_MISS: "miss", pb.CACHE_STATUS_EXACT: "exact", pb.CACHE_STATUS_COALESCED: "coalesced"}


@dataclass(frozen=True)
class CatalogItem:
    id: str
    image: bytes | str | Path | None = None  # bytes, or a path read when sent
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexResult:
    id: str
    status: str  # indexed | unchanged | failed
    error: str = ""
    code: str = ""


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    vector_score: float | None
    text_score: float | None
    rerank_score: float | None
    text: str
    metadata: dict[str, Any]
    thumbnail: bytes

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "thumbnail"}


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    model_id: str
    cache_status: str
    total_seconds: float
    request_id: str


@dataclass(frozen=True)
class CatalogInfo:
    model_id: str
    dimensions: int
    items: int
    reranker_model_id: str
    name: str


def _read(image) -> bytes:
    return Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image or b"")


def item_message(item: CatalogItem) -> pb.IndexItem:
    return pb.IndexItem(id=item.id, image=_read(item.image), text=item.text,
                        metadata={k: metadata_value(v) for k, v in item.metadata.items()})


def search_request(image=None, text: str = "", *, top_k: int = 0, filters: dict | None = None, rerank: int = 0,
                   cache: str = "use", thumbnails: bool = False, request_id: str = "") -> pb.SearchRequest:
    if cache not in POLICIES:
        raise errors.InvalidArgument(f"cache must be one of {', '.join(POLICIES)}, got {cache!r}")
    return pb.SearchRequest(image=_read(image), text=text, top_k=top_k, rerank=rerank, cache_policy=POLICIES[cache],
                            filters={k: metadata_value(v) for k, v in (filters or {}).items()}, thumbnails=thumbnails,
                            request_id=request_id)


def search_result(m: pb.SearchReply) -> SearchResult:
    hits = [Hit(h.id, h.score, h.vector_score if h.HasField("vector_score") else None,
                h.text_score if h.HasField("text_score") else None,
                h.rerank_score if h.HasField("rerank_score") else None, h.text,
                {k: python_value(v) for k, v in h.metadata.items() if v.WhichOneof("kind")},
                h.thumbnail) for h in m.hits]
    return SearchResult(hits, m.model_id, CACHE.get(m.cache_status, "unspecified"), m.timings.total_seconds,
                        m.request_id)


def index_result(m: pb.IndexResult) -> IndexResult:
    return IndexResult(m.id, STATUS.get(m.status, "failed"), m.error, m.code)


class CatalogCalls:
    """Mixed into ShelfsightClient: needs `self._channel` and `self.timeout`."""

    def _catalog(self):
        from shelfsight.protos import pb_grpc

        return pb_grpc.CatalogStub(self._channel)

    def index(self, items: Iterable[CatalogItem], timeout: float | None = None) -> Iterator[IndexResult]:
        """One result per item, in order, each once the item is stored or has failed."""
        call = self._catalog().Index((item_message(i) for i in items), timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for m in call:
                yield index_result(m)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        finally:
            call.cancel()

    def search(self, image=None, text: str = "", *, timeout: float | None = None, **kw) -> SearchResult:
        try:
            return search_result(self._catalog().Search(search_request(image, text, **kw), timeout=timeout or self.timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None

    def delete(self, ids: list[str], timeout: float | None = None) -> int:
        try:
            return self._catalog().Delete(pb.DeleteRequest(ids=ids), timeout=timeout or self.timeout, metadata=self._metadata).deleted
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None

    def catalog_info(self, timeout: float | None = None) -> CatalogInfo:
        try:
            m = self._catalog().Info(pb.CatalogInfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        return CatalogInfo(m.model_id, m.dimensions, m.items, m.reranker_model_id, m.name)


class AsyncCatalogCalls(CatalogCalls):
    """Mixed into AsyncShelfsightClient."""

    async def index(self, items: AsyncIterable[CatalogItem] | Iterable[CatalogItem],
                    timeout: float | None = None) -> AsyncIterator[IndexResult]:
        async def messages():
            if hasattr(items, "__aiter__"):
                async for i in items:
                    yield item_message(i)
            else:
                for i in items:
                    yield item_message(i)
        call = self._catalog().Index(messages(), timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for m in call:
                yield index_result(m)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        finally:
            call.cancel()

    async def search(self, image=None, text: str = "", *, timeout: float | None = None, **kw) -> SearchResult:
        try:
            return search_result(await self._catalog().Search(search_request(image, text, **kw),
                                                              timeout=timeout or self.timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None

    async def delete(self, ids: list[str], timeout: float | None = None) -> int:
        try:
            return (await self._catalog().Delete(pb.DeleteRequest(ids=ids), timeout=timeout or self.timeout, metadata=self._metadata)).deleted
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None

    async def catalog_info(self, timeout: float | None = None) -> CatalogInfo:
        try:
            m = await self._catalog().Info(pb.CatalogInfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        return CatalogInfo(m.model_id, m.dimensions, m.items, m.reranker_model_id, m.name)
