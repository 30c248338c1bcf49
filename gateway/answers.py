"""The answering core, transport-neutral: a checked request in, text pieces and one outcome out.

Every face (gRPC: gateway/vision_grpc.py, HTTP: gateway/http_face.py) parses its wire format into an
`Ask` (gateway/validate.py), calls `check()`, then `answer()`, and formats what comes back. Everything
else is here, once: the served model's limits, the result cache (exact, and perceptual for one
picture), coalescing of identical requests, the bound on model calls in flight, the choice of a Triton
replica and the retry on another, metrics and the access log's fields. Nothing here knows gRPC or HTTP.

    async with core.answer(checked, deadline) as a:     # cache lookup, or join/start a model call
        async for piece in a.pieces():                  # the text as it comes (a cached answer: one piece)
            ...
        a.outcome                                       # text, tokens, finish reason, cache status, timings

Errors are shelfsight.errors types; each face turns them into its own statuses.
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
from dataclasses import dataclass
from typing import AsyncIterator

from shelfsight.errors import ShelfsightError, Unavailable
from shelfsight.gateway.auth import CLIENT
from shelfsight.gateway.cache import CachedAnswer, Probe, ResultCache, make_key
from shelfsight.gateway.flights import Flight, Flights
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.replicas import Replicas
from shelfsight.gateway.settings import GatewaySettings
from shelfsight.gateway.upstream import Upstream
from shelfsight.gateway.validate import Ask, Checked, request_id, validate
from shelfsight.model.imaging import PixelBounds
from shelfsight.serving.pipeline import Answer, Delta

logger = logging.getLogger("shelfsight.gateway")
# Fields the core adds to the one log line each face writes per call.
CALL_LOG: contextvars.ContextVar[dict] = contextvars.ContextVar("call_log")
HASH_ON_LOOP = 1 << 20  # bytes of pictures: a larger request's key is computed on a worker thread


@dataclass(frozen=True)
class Outcome:
    text: str
    model_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    cache_status: str  # miss | exact | perceptual | coalesced
    total_seconds: float
    upstream_seconds: float
    request_id: str


class Answering:
    """One answer being produced: from the cache, or by following a model call (its own or a shared one)."""

    def __init__(self, core: "Answers", c: Checked, t0: float, kind: str, found, status: str):
        self.core, self.c, self.t0 = core, c, t0
        self.kind, self.found, self.status = kind, found, status
        self.outcome: Outcome | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it becomes available; `outcome` is set once it is complete."""
        if self.kind == "cached":
            yield self.found.text
            self._finish(self.found, 0.0)
            return
        flight: Flight = self.found
        sent, first = 0, True
        async for delta in flight.follow():
            if first:
                self.core.metrics.first_chunk.observe(time.perf_counter() - self.t0)
                first = False
            sent += len(delta)
            yield delta
        cached = self.core.stored(flight.answer, flight)
        if cached.text[sent:]:  # following a unary call: its answer comes whole, at the end
            yield cached.text[sent:]
        self._finish(cached, flight.upstream_seconds)

    async def text(self) -> str:
        return "".join([p async for p in self.pieces()])

    def _finish(self, answer: CachedAnswer, upstream_s: float) -> None:
        m = self.core.metrics
        source = "model" if self.status == "miss" else "cache"
        m.tokens.labels("prompt", source).inc(answer.prompt_tokens)
        m.tokens.labels("completion", source).inc(answer.completion_tokens)
        CALL_LOG.get({}).update(cache=self.status, prompt_tokens=answer.prompt_tokens,
                                completion_tokens=answer.completion_tokens, upstream_s=round(upstream_s, 4))
        self.outcome = Outcome(answer.text, answer.model_id, answer.prompt_tokens, answer.completion_tokens,
                               answer.finish_reason, self.status, time.perf_counter() - self.t0, upstream_s,
                               self.c.request_id or "")


class Answers:
    def __init__(self, settings: GatewaySettings, upstream: Replicas, cache: ResultCache, metrics: GatewayMetrics):
        self.settings, self.upstream, self.cache, self.metrics = settings, upstream, cache, metrics
        self.flights = Flights(settings.max_in_flight)

    # ---- the check ----
    def check(self, ask: Ask) -> Checked:
        """The request checked against what the served model allows (gateway/validate.py), counted and
        put in the call's log line. The id first, so that every log line names its call, even one
        refused as UNAVAILABLE while no replica is ready (the served model's limits are the rules)."""
        log = CALL_LOG.get({})
        rid = request_id(ask.request_id) or uuid.uuid4().hex
        log["request_id"] = rid
        info = self.upstream.model()
        for picture in ask.pictures:  # refused pictures too: what clients send
            self.metrics.image_bytes.observe(len(picture))
        log["image_bytes"] = sum(len(p) for p in ask.pictures)
        if len(ask.pictures) != 1:
            log["pictures"] = len(ask.pictures)
        c = validate(ask, info.limits, info.image_limits, info.generation)
        return dataclasses.replace(c, request_id=rid)

    def deadline(self, remaining: float | None) -> float:
        """Seconds a model call may take: the gateway's cap, shortened by the client's deadline."""
        limit = self.settings.upstream_timeout
        return limit if remaining is None else max(0.001, min(limit, remaining - 0.02))

    # ---- answering ----
    @contextlib.asynccontextmanager
    async def answer(self, c: Checked, remaining: float | None = None,
                     started: float | None = None) -> AsyncIterator[Answering]:
        """From the cache when it may, else following one model call; `remaining`: the client's deadline
        in seconds, if it has one; `started`: when the face took the request (time.perf_counter), which
        the outcome's total_seconds counts from. Counted in flight while open."""
        self.metrics.in_flight.inc()
        t0 = started if started is not None else time.perf_counter()
        try:
            kind, found, status = await self._resolve(c, remaining)
            try:
                yield Answering(self, c, t0, kind, found, status)
            finally:
                if kind == "flight":
                    self.flights.leave(found)
        finally:
            self.metrics.in_flight.dec()

    def _cacheable(self, c: Checked) -> bool:
        s = self.settings.cache
        return s.enabled and c.policy != "skip" and (c.params.deterministic or s.cache_sampled)

    def _on_lookup(self, level: str, hit: bool) -> None:
        self.metrics.cache_lookups.labels(level, "hit" if hit else "miss").inc()

    def _key(self, c: Checked, model_id: str, pixels: PixelBounds = PixelBounds()):
        extra = {}
        if pixels != PixelBounds():  # the same checkpoint served with other resize bounds sees otherwise
            extra["pixels"] = [pixels.min_pixels, pixels.max_pixels]
        if self.settings.cache_scope == "client":  # every entry (and every shared call) is one client's
            extra["client"] = CLIENT.get()
        if c.stop:
            extra["stop"] = list(c.stop)
        if c.response_format is not None:
            extra["format"] = c.response_format.to_json()
        return make_key(c.pictures, c.conversation, dataclasses.asdict(c.params), model_id, c.enhance, extra)

    async def _resolve(self, c: Checked, remaining: float | None):
        """-> ("cached", CachedAnswer, status) or ("flight", Flight, status)."""
        info = self.upstream.model()
        model_id = info.model_id
        probe = None
        if self._cacheable(c):
            key = functools.partial(self._key, c, model_id, info.pixels)
            # hashing 20 MB takes ~15 ms: not on the event loop, where every other call waits for it
            key = await asyncio.to_thread(key) if sum(map(len, c.pictures)) > HASH_ON_LOOP else key()
            # The perceptual level compares one picture against one stored picture: it applies to a request
            # with exactly one picture (whatever its turns: they are in the key's context, exactly).
            one = c.image is not None
            probe = Probe(key, encoded=c.encoded[0] if one else None, perceptual=one,
                          max_pixels=info.pixels.max_pixels)
            if c.policy == "use":
                hit = await self.cache.lookup(probe, c.image, self._on_lookup)
                if hit is not None:
                    return "cached", hit[0], hit[1]
        share = probe.key.exact if probe is not None and c.policy == "use" else None
        # A shared call must not inherit the deadline of whoever started it: a follower with a longer
        # one would fail with it. Each follower waits under its own deadline and leaves when it passes
        # (the last to leave cancels the call), so a shared call is bounded only by the gateway's cap.
        timeout = self.deadline(remaining) if share is None else self.settings.upstream_timeout
        flight, coalesced = self.flights.join(share, lambda f: self._call(f, c, probe, timeout))
        if coalesced:
            self.metrics.coalesced.inc()
        return "flight", flight, "coalesced" if coalesced else "miss"

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
                          enhance=c.enhance or None, stop=c.stop or None, response_format=c.response_format,
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
            await self.cache.put(probe, c.image, self.stored(answer, flight))
            entries_bytes = self.cache.stats()
            if entries_bytes:
                self.metrics.cache_entries.set(entries_bytes[0])
                self.metrics.cache_bytes.set(entries_bytes[1])
        await flight.finish(answer)

    @staticmethod
    async def _stream(replica: Upstream, flight: Flight, c: Checked, kw: dict) -> Delta:
        """Stream one answer from `replica` into the flight; returns the last delta (the counts)."""
        last = None
        async for delta in replica.client.converse_stream(c.pictures, c.conversation, **kw):
            if delta.text:
                await flight.push(delta.text)
            last = delta
        return last

    @staticmethod
    def stored(answer: Answer, flight: Flight) -> CachedAnswer:
        return CachedAnswer(answer.text, flight.model_id, answer.prompt_tokens, answer.completion_tokens,
                            answer.finish_reason, time.time())
