"""The result cache: exact and perceptual, in memory or shared through Redis.

Every key holds the model id, the normalized conversation (every turn's texts, where its pictures go),
the enhancement flag, the *effective* generation parameters (defaults filled in) and any stop sequences
or response format, so an answer is never reused for another model, question or setting: the failure
peers shipped when they keyed on placeholder tokens (anchors.md).

    exact       sha256 of every picture's bytes, in order + context
    perceptual  the same context, a pHash within `max_distance` bits and a colour layout within
                `max_colour_distance` (see Signature) find *candidates*; one is served only when the
                two pictures agree everywhere, pixel by pixel after alignment (see `difference`):
                the hash alone served the answer for "$4.99" to a photo of "$9.99".

Only complete, successful answers are stored (the service decides what qualifies).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import time
import unicodedata
from collections import OrderedDict
from dataclasses import asdict, dataclass

from shelfsight.errors import CacheUnavailable
from shelfsight.gateway.likeness import (FINEST, Signature, Thumbnail, check_side, checkable, decode_picture,
                                         decoded_pixels, difference, near, signature_of, thumbnail, view_side)
from shelfsight.gateway.settings import CacheSettings
from shelfsight.model.imaging import Encoded, PixelBounds

ENTRY_OVERHEAD = 256  # bytes per entry beyond its value: keys, bookkeeping


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    model_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    created: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "CachedAnswer":
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class CacheKey:
    exact: str
    context: str


def normalize(text: str) -> str:
    """NFC, trimmed, inner whitespace runs as one space: how a question is compared."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def make_key(pictures, conversation, params: dict, model_id: str, enhance: bool, extra: dict | None = None) -> CacheKey:
    """`conversation`: a shelfsight.conversation.Conversation; texts are compared normalized."""
    turns = [[t.role, [None if p is None else normalize(p) for p in t.parts]] for t in conversation.turns]
    context = hashlib.sha256(json.dumps(
        {"model": model_id, "turns": turns, "params": params, "enhance": bool(enhance), **(extra or {})},
        sort_keys=True).encode()).hexdigest()
    pictures_digest = b"".join(hashlib.sha256(p).digest() for p in pictures)
    exact = hashlib.sha256(pictures_digest + context.encode()).hexdigest()
    return CacheKey(exact=exact, context=context)


def _nearest_first(found: list[tuple[tuple[float, int], str]]) -> list[str]:
    return [exact for _, exact in sorted(found)]


SCAN_ON_LOOP = 256  # signatures compared on the event loop; more are compared on a worker thread


async def near_ones(entries: list[tuple[str, Signature | str]], sig: Signature, max_distance: int,
                     max_colour: float) -> list[tuple[tuple[float, int], str]]:
    """The entries (exact key, signature or its text) within both bounds of `sig`. A context can hold
    thousands of pictures (one question asked of a whole catalogue), ~7 us each: a scan of 10,000 is
    70 ms, which must not hold every other call's event loop."""
    def scan():
        return [(d, exact) for exact, other in entries
                if (d := near(sig, other if isinstance(other, Signature) else Signature.decode(other),
                              max_distance, max_colour)) is not None]
    return scan() if len(entries) <= SCAN_ON_LOOP else await asyncio.to_thread(scan)


class MemoryStore:
    """Process-local store: LRU by bytes (answers and thumbnails), TTL per entry, the picture
    signatures of each context."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._entries: OrderedDict[str, tuple[bytes, float, str, bytes | None]] = OrderedDict()
        self._by_context: dict[str, dict[str, Signature]] = {}

    async def get(self, exact: str) -> bytes | None:
        item = self._entries.get(exact)
        if item is None:
            return None
        if item[1] < time.time():
            self._remove(exact)
            return None
        self._entries.move_to_end(exact)
        return item[0]

    async def thumbnail(self, exact: str) -> bytes | None:
        item = self._entries.get(exact)
        return item[3] if item is not None else None

    async def candidates(self, context: str, sig: Signature, max_distance: int, max_colour: float) -> list[str]:
        entries = list(self._by_context.get(context, {}).items())  # a snapshot: puts may run meanwhile
        return _nearest_first(await near_ones(entries, sig, max_distance, max_colour))

    async def put(self, exact: str, context: str, sig: Signature | None, value: bytes, ttl: float,
                  thumb: bytes | None = None) -> None:
        size = len(value) + len(thumb or b"") + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if exact in self._entries:
            self._remove(exact)
        while self.used + size > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))
        self._entries[exact] = (value, time.time() + ttl, context, thumb)
        self.used += size
        if sig is not None:
            self._by_context.setdefault(context, {})[exact] = sig

    def _remove(self, exact: str) -> None:
        value, _, context, thumb = self._entries.pop(exact)
        self.used -= len(value) + len(thumb or b"") + ENTRY_OVERHEAD
        hashes = self._by_context.get(context)
        if hashes is not None:
            hashes.pop(exact, None)
            if not hashes:
                del self._by_context[context]

    def keys(self) -> list[str]:
        """The exact keys held, least recently used first (expired ones until a lookup drops them)."""
        return list(self._entries)

    def stats(self) -> tuple[int, int]:
        return len(self._entries), self.used

    async def close(self) -> None:
        pass


class RedisStore:
    """Shared store for several gateways: answers and thumbnails as keys with a TTL, picture hashes per
    context in a hash. Redis's own maxmemory policy bounds its size.

    Every failure leaves as CacheUnavailable; the gateway wraps this store in resilient.GuardedStore,
    which bounds each operation in time and answers without Redis while it is down."""

    # A pooled connection idle this long is PINGed before its next command: one that a Redis restart or
    # a NAT cut while idle is replaced instead of failing a request.
    HEALTH_CHECK_SECONDS = 15

    def __init__(self, url: str, prefix: str = "shelfsight", timeout: float = 5.0):
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Socket timeouts so that a hung Redis cannot hold a connection for redis-py's default 5 s.
        # One immediate retry on a fresh connection: after Redis restarts, every pooled connection is
        # dead and would fail its first command. Every command here is idempotent (GET, SET, HSET,
        # PEXPIRE, EXISTS, HGETALL, HDEL, PING), so sending one twice is harmless.
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                          retry=Retry(NoBackoff(), retries=1),
                                          health_check_interval=self.HEALTH_CHECK_SECONDS)
        self.prefix = prefix

    @contextlib.asynccontextmanager
    async def _reach(self, what: str):
        from redis.exceptions import ConnectionError, RedisError, TimeoutError

        try:
            yield
        except (ConnectionError, TimeoutError, OSError) as e:  # OSError: what a socket raises unwrapped
            raise CacheUnavailable(f"redis {what}: {type(e).__name__}: {e}") from e
        except RedisError as e:  # it answered, with an error: it is up but refuses this
            raise CacheUnavailable(f"redis {what}: {type(e).__name__}: {e}", reachable=True) from e

    async def get(self, exact: str) -> bytes | None:
        async with self._reach("get"):
            return await self.redis.get(f"{self.prefix}:x:{exact}")

    async def thumbnail(self, exact: str) -> bytes | None:
        async with self._reach("thumbnail"):
            return await self.redis.get(f"{self.prefix}:t:{exact}")

    async def candidates(self, context: str, sig: Signature, max_distance: int, max_colour: float) -> list[str]:
        found = await near_ones(await self.signatures(context), sig, max_distance, max_colour)
        return await self.live(context, found)

    async def signatures(self, context: str) -> list[tuple[str, str]]:
        """(exact key, signature text) of every picture stored under `context`: one Redis round trip."""
        async with self._reach("candidates"):
            raw = await self.redis.hgetall(f"{self.prefix}:p:{context}")
        return [(exact.decode(), sig.decode()) for exact, sig in raw.items()]

    async def live(self, context: str, found: list[tuple[tuple[float, int], str]]) -> list[str]:
        """The found keys whose answers still exist, nearest first; the expired ones' signatures are
        forgotten. The Redis half of `candidates`, apart from the scan (the guard bounds only this)."""
        if not found:
            return []
        async with self._reach("candidates"):
            pipe = self.redis.pipeline()
            for _, exact in found:
                pipe.exists(f"{self.prefix}:x:{exact}")
            live = await pipe.execute()
            gone = [exact for (_, exact), ok in zip(found, live) if not ok]
            if gone:  # their answers expired: forget their signatures too
                await self.redis.hdel(f"{self.prefix}:p:{context}", *gone)
        return _nearest_first([f for f, ok in zip(found, live) if ok])

    async def put(self, exact: str, context: str, sig: Signature | None, value: bytes, ttl: float,
                  thumb: bytes | None = None) -> None:
        ms = max(1, int(ttl * 1000))
        pipe = self.redis.pipeline()
        pipe.set(f"{self.prefix}:x:{exact}", value, px=ms)
        if thumb is not None:
            pipe.set(f"{self.prefix}:t:{exact}", thumb, px=ms)
        if sig is not None:
            index = f"{self.prefix}:p:{context}"
            pipe.hset(index, exact, sig.encode())
            pipe.pexpire(index, ms)
        async with self._reach("put"):
            await pipe.execute()

    async def ping(self) -> None:
        async with self._reach("ping"):
            await self.redis.ping()

    async def reset(self) -> None:
        """Drop the idle pooled connections: after an outage they point at a server that is gone (one in
        use is its command's to drop, and redis-py does when that command fails)."""
        async with self._reach("reset"):
            await self.redis.connection_pool.disconnect(inuse_connections=False)

    def stats(self) -> tuple[int, int] | None:
        return None  # lives in Redis; see its INFO

    async def close(self) -> None:
        await self.redis.aclose()


@dataclass
class Probe:
    """What a lookup learned, reused when the answer is stored after a miss."""

    key: CacheKey
    encoded: Encoded | None = None  # format and size from the header (validate): what decoding costs
    signature: Signature | None = None
    picture: object = None  # the decoded picture (Pillow RGB, < 2 x KEEP_SIDE) while candidates are checked
    thumb: bytes | None = None  # the encoded thumbnail, kept from a miss until the answer is stored
    perceptual: bool = True  # False: exact only (a request with several pictures, or none)
    max_pixels: int = PixelBounds.max_pixels  # the served model's resize bound: how finely it sees the picture
    view: float = 0.0  # the long side of the model's view of the picture (likeness.view_side), once decoded

    @property
    def cost(self) -> int:
        """Pixels decoding the picture holds at its peak (0: unknown, never held back)."""
        return decoded_pixels(self.encoded) if self.encoded else 0


class DecodeBudget:
    """Bounds the pixels being decoded at once: a 40 MP PNG holds 120 MB while it decodes, and eight
    at once held 6 GB. A picture larger than the whole budget still goes, alone. Pixels are given back
    when the decode itself ends, not when the request waiting for it does: a decode on a thread cannot
    be cancelled, so a client that gives up must not free what that thread still holds."""

    def __init__(self, pixels: int):
        self.limit, self.used = pixels, 0
        self._waiting: list[asyncio.Future] = []

    async def acquire(self, pixels: int) -> None:
        while not (self.used == 0 or self.used + pixels <= self.limit):
            woken = asyncio.get_running_loop().create_future()
            self._waiting.append(woken)
            try:
                await woken
            finally:
                if woken in self._waiting:
                    self._waiting.remove(woken)
        self.used += pixels

    def release(self, pixels: int) -> None:
        """On the event loop's thread (the cache calls it through call_soon_threadsafe)."""
        self.used -= pixels
        for woken in self._waiting:  # each checks again whether it fits now
            if not woken.done():
                woken.set_result(None)
        self._waiting.clear()


class ResultCache:
    MAX_CANDIDATES = 4  # candidates verified per lookup, nearest hash first

    def __init__(self, settings: CacheSettings, store=None):
        self.settings = settings
        self.store = store or (RedisStore(settings.redis_url) if settings.redis_url else MemoryStore(settings.max_bytes))
        self.decoding = DecodeBudget(settings.decode_pixels)
        # Picture work (decodes, checks, thumbnails) on threads of its own, one per core: CPU-bound, and
        # kept from the default pool that the rest of the gateway shares.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                                           thread_name_prefix="shelfsight-picture")

    async def _run(self, fn, *args):
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def _examine(self, probe: Probe, image: bytes) -> None:
        probe.picture = decode_picture(image, probe.encoded.pixels if probe.encoded else None)
        probe.view = view_side(*probe.picture.info["source"], probe.max_pixels)
        # A picture the model sees more finely than any thumbnail can is cached exactly only: without a
        # signature it is neither looked up nor stored as a candidate.
        probe.signature = signature_of(probe.picture, self.settings.phash_bits) if checkable(probe.view) else None

    async def _decode(self, probe: Probe, image: bytes) -> None:
        """Decode off the event loop, within the budget; a picture Pillow cannot read has no signature."""
        cost = probe.cost
        await self.decoding.acquire(cost)
        loop = asyncio.get_running_loop()
        try:
            job = self._pool.submit(self._examine, probe, image)
        except BaseException:
            self.decoding.release(cost)
            raise
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.decoding.release, cost))
        await asyncio.wrap_future(job)

    def _keep_thumbnail(self, probe: Probe) -> None:
        """Make the thumbnail a stored answer will need and let go of the decoded picture."""
        if self.settings.verify and probe.thumb is None and probe.picture is not None:
            if probe.signature is not None:
                probe.thumb = thumbnail(probe.picture, check_side(probe.view, self.settings.verify_side)).encode()
        probe.picture = None

    async def lookup(self, probe: Probe, image: bytes, on_result) -> tuple[CachedAnswer, str] | None:
        """(answer, "exact" | "perceptual") or None. on_result(level, hit) reports each lookup."""
        raw = await self.store.get(probe.key.exact)
        on_result("exact", raw is not None)
        if raw is not None:
            return CachedAnswer.decode(raw), "exact"
        if not (self.settings.perceptual and probe.perceptual) or not getattr(self.store, "up", True):
            return None  # (a shared store that is down has no candidates: decoding would be wasted)
        if not self._checkable(probe):  # seen by the model more finely than a check can: exact only
            on_result("perceptual", False)
            return None
        try:
            await self._decode(probe, image)
        except Exception:  # a picture Pillow cannot read has no neighbours; Triton will say why
            on_result("perceptual", False)
            return None
        if probe.signature is None:  # seen by the model more finely than a check can: exact only
            on_result("perceptual", False)
            probe.picture = None
            return None
        s = self.settings
        found = await self.store.candidates(probe.key.context, probe.signature, s.max_distance, s.max_colour_distance)
        for exact in found[:self.MAX_CANDIDATES]:
            if s.verify and not await self._same_picture(probe, exact):
                continue
            raw = await self.store.get(exact)
            if raw is not None:
                on_result("perceptual", True)
                probe.picture = None
                return CachedAnswer.decode(raw), "perceptual"
        on_result("perceptual", False)
        # A miss: the model is asked next, and its answer stored with this thumbnail. Only the
        # thumbnail (~100-250 KiB) waits for it, not the decoded picture.
        await self._run(self._keep_thumbnail, probe)
        return None

    @staticmethod
    def _checkable(probe: Probe) -> bool:
        """From the header alone where there is one (no decode is spent on a picture that cannot be
        checked); else after decoding (`_examine` leaves such a picture without a signature)."""
        return not probe.encoded or checkable(view_side(probe.encoded.width, probe.encoded.height, probe.max_pixels))

    async def _same_picture(self, probe: Probe, exact: str) -> bool:
        raw = await self.store.thumbnail(exact)
        if raw is None:  # stored without one (verification was off): cannot be vouched for
            return False
        try:
            stored = Thumbnail.decode(raw)
            # A thumbnail coarser than the model's view of the asked picture cannot vouch for print the
            # model reads in it (a 512 px one, stored by an older gateway, for a 3000 px photo).
            if stored is None or max(stored.grey.shape) < FINEST * probe.view - 1:
                return False
            return await self._run(difference, probe.picture, stored) <= self.settings.max_difference
        except Exception:  # a damaged entry is a miss, never a failed request
            return False

    async def put(self, probe: Probe, image: bytes, answer: CachedAnswer) -> None:
        if self.settings.perceptual and probe.perceptual and getattr(self.store, "up", True) and self._checkable(probe):
            try:
                if not probe.view:  # not looked up (REFRESH): decode now
                    await self._decode(probe, image)
                await self._run(self._keep_thumbnail, probe)
            except Exception:
                probe.signature, probe.thumb = None, None
        probe.picture = None
        await self.store.put(probe.key.exact, probe.key.context, probe.signature, answer.encode(),
                             self.settings.ttl_seconds, probe.thumb)
        probe.thumb = None

    def stats(self):
        return self.store.stats()

    async def close(self) -> None:
        await self.store.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
