"""The ProductVision service: validate at the edge, answer from the cache when allowed, otherwise share
or start one model call, and reply with where the answer came from and how long it took.

Errors are raised as shelfsight.errors types; the interceptor (gateway/server.py) turns them into gRPC
statuses, counts and logs them.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import time
import uuid

from shelfsight.errors import ShelfsightError, Unavailable
from shelfsight.gateway.cache import CachedAnswer, Probe, ResultCache, make_key
from shelfsight.gateway.flights import Flight, Flights
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.replicas import Replicas
from shelfsight.gateway.settings import GatewaySettings
from shelfsight.gateway.upstream import Upstream
from shelfsight.gateway.validate import Checked, request_id, validate
from shelfsight.protos import pb, pb_grpc
from shelfsight.serving.pipeline import Answer, Delta

logger = logging.getLogger("shelfsight.gateway")
# Fields the service adds to the one log line the interceptor writes per call.
CALL_LOG: contextvars.ContextVar[dict] = contextvars.ContextVar("call_log")
STATUS = {"miss": pb.CACHE_STATUS_MISS, "exact": pb.CACHE_STATUS_EXACT, "perceptual": pb.CACHE_STATUS_PERCEPTUAL,
          "coalesced": pb.CACHE_STATUS_COALESCED}
HASH_ON_LOOP = 1 << 20  # bytes: a larger image's key is computed on a worker thread


class ProductVisionService(pb_grpc.ProductVisionServicer):
    def __init__(self, settings: GatewaySettings, upstream: Replicas, cache: ResultCache, metrics: GatewayMetrics):
        self.settings, self.upstream, self.cache, self.metrics = settings, upstream, cache, metrics
        self.flights = Flights(settings.max_in_flight)

    # ---- edge validation ----
    def check(self, request) -> Checked:
        """The request checked against what the served model allows (gateway/validate.py), counted and
        put in the call's log line. The id first, so that every log line names its call, even one
        refused as UNAVAILABLE while no replica is ready (the served model's limits are the rules)."""
        log = CALL_LOG.get({})
        rid = request_id(request.request_id) or uuid.uuid4().hex
        log["request_id"] = rid
        info = self.upstream.model()
        self.metrics.image_bytes.observe(len(request.image))  # refused images too: what clients send
        log["image_bytes"] = len(request.image)
        c = validate(request, info.limits, info.image_limits, info.generation)
        return dataclasses.replace(c, request_id=rid)

    def _cacheable(self, c: Checked) -> bool:
        s = self.settings.cache
        return s.enabled and c.policy != pb.CACHE_POLICY_SKIP and (c.params.deterministic or s.cache_sampled)

    def _on_lookup(self, level: str, hit: bool) -> None:
        self.metrics.cache_lookups.labels(level, "hit" if hit else "miss").inc()

    def deadline(self, context) -> float:
        """Seconds a model call may take for this RPC: the gateway's cap, shortened by the client's deadline."""
        remaining = context.time_remaining()
        limit = self.settings.upstream_timeout
        return limit if remaining is None else max(0.001, min(limit, remaining - 0.02))

    # ---- the model call ----
    async def _call(self, flight: Flight, c: Checked, probe: Probe | None, timeout: float) -> None:
        """One model call. Always through `pipeline_stream`, also for unary replies (they join the
        deltas): one path into the engine, without the BLS hop of the unary ensemble, and any
        request - streaming or not - can follow any flight.

        It goes to the best ready replica; if that one fails UNAVAILABLE (its Triton died or lost a
        model process) before any text was produced, the call is retried once on another replica.
        Never after text: a follower may already have streamed it."""
        deadline = time.monotonic() + timeout
        self.metrics.model_calls.inc()
        t0 = time.perf_counter()
        outcome = "OK"
        tried = []
        try:
            while True:
                replica = self.upstream.pick(exclude=tried)
                tried.append(replica)
                kw = dict(timeout=max(0.001, deadline - time.monotonic()), request_id=c.request_id,
                          enhance=c.enhance or None,
                          **c.params.as_request())
                try:
                    last = await self.upstream.call(replica, self._stream(replica, flight, c, kw))
                    break
                except Unavailable as e:
                    if flight.deltas or len(tried) > 1 or not self.upstream.has_other(tried):
                        raise
                    logger.warning("request %s: %s; retrying on another replica", c.request_id, e.message)
                    self.metrics.replica_retries.inc()
            flight.model_id = replica.info.model_id
            answer = Answer("".join(flight.deltas), last.prompt_tokens, last.completion_tokens, last.finish_reason)
        except ShelfsightError as e:
            outcome = e.code
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            flight.upstream_seconds = time.perf_counter() - t0
            self.metrics.upstream.labels(outcome).observe(flight.upstream_seconds)
            self.metrics.model_calls.dec()
        if probe is not None and answer.finish_reason in ("stop", "length"):  # complete answers only
            await self.cache.put(probe, c.image, self._outcome(answer, flight))
            entries_bytes = self.cache.stats()
            if entries_bytes:
                self.metrics.cache_entries.set(entries_bytes[0])
                self.metrics.cache_bytes.set(entries_bytes[1])
        await flight.finish(answer)

    @staticmethod
    async def _stream(replica: Upstream, flight: Flight, c: Checked, kw: dict) -> Delta:
        """Stream one answer from `replica` into the flight; returns the last delta (the counts)."""
        last = None
        async for delta in replica.client.stream(c.image, c.question, c.system or None, **kw):
            if delta.text:
                await flight.push(delta.text)
            last = delta
        return last

    async def _resolve(self, c: Checked, context):
        """-> ("cached", CachedAnswer, status) or ("flight", Flight, status)."""
        model_id = self.upstream.model().model_id
        probe = None
        if self._cacheable(c):
            key = functools.partial(make_key, c.image, c.question, c.system, dataclasses.asdict(c.params), model_id,
                                    c.enhance)
            # hashing 20 MB takes ~15 ms: not on the event loop, where every other call waits for it
            key = await asyncio.to_thread(key) if len(c.image) > HASH_ON_LOOP else key()
            probe = Probe(key, encoded=c.encoded)
            if c.policy == pb.CACHE_POLICY_USE:
                hit = await self.cache.lookup(probe, c.image, self._on_lookup)
                if hit is not None:
                    return "cached", hit[0], hit[1]
        share = probe.key.exact if probe is not None and c.policy == pb.CACHE_POLICY_USE else None
        # A shared call must not inherit the deadline of whoever started it: a follower with a longer
        # one would fail with it. Each follower waits under its own deadline and leaves when it passes
        # (the last to leave cancels the call), so a shared call is bounded only by the gateway's cap.
        timeout = self.deadline(context) if share is None else self.settings.upstream_timeout
        flight, coalesced = self.flights.join(share, lambda f: self._call(f, c, probe, timeout))
        if coalesced:
            self.metrics.coalesced.inc()
        return "flight", flight, "coalesced" if coalesced else "miss"

    def _summary(self, c: Checked, outcome: CachedAnswer, status: str, t0: float, upstream_s: float) -> dict:
        """Account for an answer (metrics, access log) and return the fields every reply carries."""
        source = "model" if status == "miss" else "cache"
        self.metrics.tokens.labels("prompt", source).inc(outcome.prompt_tokens)
        self.metrics.tokens.labels("completion", source).inc(outcome.completion_tokens)
        CALL_LOG.get({}).update(cache=status, prompt_tokens=outcome.prompt_tokens,
                                completion_tokens=outcome.completion_tokens, upstream_s=round(upstream_s, 4))
        return dict(model_id=outcome.model_id, cache_status=STATUS[status], finish_reason=outcome.finish_reason,
                    usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens),
                    request_id=c.request_id,
                    timings=pb.Timings(total_seconds=time.perf_counter() - t0, upstream_seconds=upstream_s))

    @staticmethod
    def _outcome(answer: Answer, flight: Flight) -> CachedAnswer:
        return CachedAnswer(answer.text, flight.model_id, answer.prompt_tokens, answer.completion_tokens,
                            answer.finish_reason, time.time())

    # ---- RPCs ----
    @contextlib.contextmanager
    def _in_flight(self):
        """Counts the call in flight while it runs; yields its start time."""
        self.metrics.in_flight.inc()
        try:
            yield time.perf_counter()
        finally:
            self.metrics.in_flight.dec()

    async def _begin(self, request, context) -> tuple:
        """-> (Checked, kind, cached answer or flight, cache status); see _resolve."""
        c = self.check(request)
        return (c, *await self._resolve(c, context))

    async def Recognize(self, request, context):
        with self._in_flight() as t0:
            c, kind, found, status = await self._begin(request, context)
            if kind == "cached":
                outcome, upstream_s = found, 0.0
            else:
                try:
                    outcome, upstream_s = self._outcome(await found.result(), found), found.upstream_seconds
                finally:
                    self.flights.leave(found)
            return pb.RecognizeReply(text=outcome.text, **self._summary(c, outcome, status, t0, upstream_s))

    async def _pieces(self, kind: str, found, done: list):
        """The answer's text as it becomes available; `done` receives (outcome, upstream seconds)."""
        if kind == "cached":
            done.append((found, 0.0))
            yield found.text
            return
        sent = 0
        try:
            async for delta in found.follow():
                sent += len(delta)
                yield delta
            outcome = self._outcome(found.answer, found)
        finally:
            self.flights.leave(found)
        if outcome.text[sent:]:  # following a unary call: its answer comes whole, at the end
            yield outcome.text[sent:]
        done.append((outcome, found.upstream_seconds))

    async def RecognizeStream(self, request, context):
        with self._in_flight() as t0:
            c, kind, found, status = await self._begin(request, context)
            done, first = [], True
            async for piece in self._pieces(kind, found, done):
                if first:
                    self.metrics.first_chunk.observe(time.perf_counter() - t0)
                    first = False
                yield pb.RecognizeChunk(text=piece)
            outcome, upstream_s = done[0]
            yield pb.RecognizeChunk(final=True, **self._summary(c, outcome, status, t0, upstream_s))
