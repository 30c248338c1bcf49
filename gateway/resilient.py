"""The shared result cache may fail; a request must not.

The cache is an optimisation. With `--redis`, a dead Redis used to fail every cached request
INTERNAL, throw away answers already computed (at `put`), and log a traceback per failure. A
GuardedStore stands between ResultCache and its RedisStore:

- every operation gets `redis_timeout` seconds, all retries included: a hung Redis (it accepts and
  never answers) costs a request at most that, once;
- a failure answers as the cache would when empty (a miss, nothing stored) and is counted
  (`shelfsight_cache_errors_total{op}`);
- the first failure marks the store down: one log line, no traceback, `shelfsight_cache_up` 0, the
  health service CACHE_HEALTH NOT_SERVING. While down no request touches Redis (counted in
  `shelfsight_cache_skipped_total{op}`) and one background probe PINGs it every `redis_retry`
  seconds, so requests never pay a connect timeout;
- when a PING answers, the pooled connections (all opened to the server that went away) are dropped
  and the store is up again: one log line, gauge 1, SERVING.

An error Redis *answers* with (out of memory, a read-only replica) is counted and logged at most once
a minute, but does not mark the store down: Redis is there, and a PING would bring it straight back.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

from shelfsight.errors import CacheUnavailable
from shelfsight.gateway.cache import MemoryStore, RedisStore, near_ones
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.settings import CacheSettings
from shelfsight.gateway.tasks import Background

log = logging.getLogger("shelfsight.gateway.cache")
T = TypeVar("T")
OPS = ("get", "thumbnail", "candidates", "put")
REFUSED_LOG_EVERY = 60.0  # seconds between log lines about errors a reachable Redis answers with


class GuardedStore:
    """A shared store whose failures are bounded in time, counted, and never raised."""

    def __init__(self, inner, timeout: float, retry: float, metrics: GatewayMetrics | None = None,
                 on_change: Callable[[bool], None] | None = None):
        self.inner, self.timeout, self.retry = inner, timeout, retry
        self.metrics, self.on_change = metrics, on_change
        self.up = True  # until an operation says otherwise: starting must not wait on Redis
        self._down_since = 0.0
        self._skipped = 0  # operations not attempted during the current outage
        self._refused_logged = float("-inf")
        self._tasks = Background()  # the probe while down
        if metrics is not None:
            metrics.cache_up.set(1)

    async def start(self) -> "GuardedStore":
        """One bounded PING, so that a Redis already down at start shows in health at once."""
        try:
            await self._bounded("ping", self.inner.ping)
        except CacheUnavailable as e:
            self._failed("ping", e)
        return self

    # ---- the store's operations ----
    async def get(self, exact: str) -> bytes | None:
        return await self._guard("get", lambda: self.inner.get(exact), None)

    async def thumbnail(self, exact: str) -> bytes | None:
        return await self._guard("thumbnail", lambda: self.inner.thumbnail(exact), None)

    async def candidates(self, context: str, sig, max_distance: int, max_colour: float) -> list[str]:
        # Only the round trips are bounded: the scan between them is local work (on a thread when it is
        # long), and a busy thread pool must not read as a Redis that stopped answering.
        entries = await self._guard("candidates", lambda: self.inner.signatures(context), None)
        if not entries:
            return []
        found = await near_ones(entries, sig, max_distance, max_colour)
        return await self._guard("candidates", lambda: self.inner.live(context, found), [])

    async def put(self, exact: str, context: str, sig, value: bytes, ttl: float, thumb: bytes | None = None) -> None:
        await self._guard("put", lambda: self.inner.put(exact, context, sig, value, ttl, thumb), None)

    def stats(self):
        return self.inner.stats()

    async def close(self) -> None:
        await self._tasks.close()
        await self.inner.close()

    # ---- failure handling ----
    async def _bounded(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except TimeoutError as e:  # redis-py disconnects the connection it was cancelled on
            raise CacheUnavailable(f"redis {op}: no answer within {self.timeout:g} s") from e

    async def _guard(self, op: str, call: Callable[[], Awaitable[T]], fallback: T) -> T:
        if not self.up:
            self._skipped += 1
            if self.metrics is not None:
                self.metrics.cache_skipped.labels(op).inc()
            return fallback
        try:
            return await self._bounded(op, call)
        except CacheUnavailable as e:
            self._failed(op, e)
            return fallback

    def _failed(self, op: str, e: CacheUnavailable) -> None:
        if self.metrics is not None and op in OPS:
            self.metrics.cache_errors.labels(op).inc()
        if e.reachable:
            now = time.monotonic()
            if now - self._refused_logged >= REFUSED_LOG_EVERY:
                self._refused_logged = now
                log.warning("result cache failed: %s (going on without it; logged at most once a minute)",
                            e.message)
            return
        if not self.up:  # others in flight when it went down: already said
            return
        self.up, self._down_since, self._skipped = False, time.monotonic(), 0
        log.warning("result cache down (%s): answering from the model, probing every %g s", e.message, self.retry)
        self._changed(False)
        self._tasks.spawn(self._recover(), name="redis probe")

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(self.retry)
            try:
                # the idle pooled connections were opened to the server that went away
                await self._bounded("reset", self.inner.reset)
                await self._bounded("ping", self.inner.ping)
                break
            except CacheUnavailable:
                continue
        self.up = True
        log.info("result cache back up after %.1f s (%d operations went without it)",
                 time.monotonic() - self._down_since, self._skipped)
        self._changed(True)

    def _changed(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.cache_up.set(1 if up else 0)
        if self.on_change is not None:
            self.on_change(up)


def open_store(settings: CacheSettings, metrics: GatewayMetrics | None = None,
               on_change: Callable[[bool], None] | None = None):
    """The store a gateway's ResultCache uses: Redis behind a guard when shared, else in memory (which
    cannot fail: its gauge stays 1)."""
    if settings.redis_url:
        redis = RedisStore(settings.redis_url, timeout=settings.redis_timeout)
        return GuardedStore(redis, settings.redis_timeout, settings.redis_retry, metrics, on_change)
    if metrics is not None:
        metrics.cache_up.set(1)
    return MemoryStore(settings.max_bytes)
