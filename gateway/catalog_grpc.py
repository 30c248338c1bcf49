"""The gRPC face of catalog search (`shelfsight.v1.Catalog`): protobuf messages to the core's dataclasses
(gateway/search.py) and back. Nothing about the catalog, Triton or caching lives here; errors are the
core's typed errors, which the interceptor (gateway/server.py) turns into statuses.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from shelfsight.errors import InvalidArgument, ShelfsightError
from shelfsight.gateway.malformed import Malformed
from shelfsight.gateway.search import IndexEntry, SearchQuery, SearchService
from shelfsight.gateway.answers import CALL_LOG
from shelfsight.gateway.validate import request_id
from shelfsight.protos import metadata_value, pb, pb_grpc, python_value

STATUS = {"indexed": pb.INDEX_STATUS_INDEXED, "unchanged": pb.INDEX_STATUS_UNCHANGED, "failed": pb.INDEX_STATUS_FAILED}
CACHE = {"miss": pb.CACHE_STATUS_MISS, "exact": pb.CACHE_STATUS_EXACT, "coalesced": pb.CACHE_STATUS_COALESCED}
POLICY = {pb.CACHE_POLICY_USE: "use", pb.CACHE_POLICY_SKIP: "skip", pb.CACHE_POLICY_REFRESH: "refresh"}


def value_of(v: pb.MetadataValue, where: str) -> Any:
    value = python_value(v)
    if value is None:
        raise InvalidArgument(f"{where} has no value")
    return value


def to_value(x: Any) -> pb.MetadataValue:
    """What the catalog stored, as the API carries it: a value of another JSON type as its text."""
    return metadata_value(x if isinstance(x, (bool, int, float, str)) else str(x))


def metadata_of(m, field: str) -> dict[str, Any]:
    return {k: value_of(v, f"{field}[{k!r}]") for k, v in m.items()}


def hit_message(h) -> pb.SearchHit:
    out = pb.SearchHit(id=h.id, score=h.score, text=h.text, thumbnail=h.thumbnail,
                       metadata={k: to_value(v) for k, v in h.metadata.items()})
    for name in ("vector_score", "text_score", "rerank_score"):
        if getattr(h, name) is not None:
            setattr(out, name, getattr(h, name))
    return out


class CatalogServicer(pb_grpc.CatalogServicer):
    def __init__(self, core: SearchService, timeout_of):
        self.core, self.timeout_of = core, timeout_of

    async def Index(self, request_iterator, context):
        async def entries():
            async for m in request_iterator:
                if isinstance(m, Malformed):  # its id is not readable: reported under ""
                    yield IndexEntry("", error=InvalidArgument(m.message))
                    continue
                try:
                    yield IndexEntry(m.id, m.image, m.text, metadata_of(m.metadata, "metadata"))
                except ShelfsightError as e:
                    yield IndexEntry(m.id, error=e)

        counts = CALL_LOG.get({}).setdefault("items", {})
        async for o in self.core.index(entries(), self.timeout_of(context)):
            counts[o.status] = counts.get(o.status, 0) + 1
            yield pb.IndexResult(id=o.id, status=STATUS[o.status], error=o.error.message if o.error else "",
                                 code=o.error.code if o.error else "")

    async def Delete(self, request, context):
        return pb.DeleteReply(deleted=await self.core.delete(list(request.ids)))

    async def Search(self, request, context):
        t0 = time.perf_counter()
        rid = request_id(request.request_id) or ""
        CALL_LOG.get({})["request_id"] = rid
        if request.cache_policy not in POLICY:
            raise InvalidArgument(f"cache_policy {request.cache_policy} is not one of {', '.join(POLICY.values())}")
        q = SearchQuery(image=request.image, text=request.text, top_k=request.top_k,
                        filters=metadata_of(request.filters, "filters"), rerank=request.rerank,
                        policy=POLICY[request.cache_policy], thumbnails=request.thumbnails)
        out = await self.core.search(q, self.timeout_of(context))
        upstream = out.seconds.get("embed", 0.0) + out.seconds.get("rerank", 0.0)
        CALL_LOG.get({}).update(cache=out.cache, hits=len(out.hits), **{f"{k}_s": round(v, 4) for k, v in out.seconds.items()})
        return pb.SearchReply(hits=[hit_message(h) for h in out.hits], model_id=out.model_id,
                              cache_status=CACHE[out.cache], request_id=rid,
                              timings=pb.Timings(total_seconds=time.perf_counter() - t0, upstream_seconds=upstream))

    async def Info(self, request, context):
        info = await self.core.info()
        return pb.CatalogInfo(**dataclasses.asdict(info))
