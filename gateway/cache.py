"""The result cache: exact and perceptual, in memory or shared through Redis.

Every key holds the model id, the normalized question and system prompt, the enhancement flag and the
*effective* generation parameters (defaults filled in), so an answer is never reused for another model,
question or setting: the failure peers shipped when they keyed on placeholder tokens (anchors.md).

    exact       sha256(image bytes) + context
    perceptual  the same context, and a pHash of the picture within `max_distance` bits

Only complete, successful answers are stored (the service decides what qualifies).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import unicodedata
from collections import OrderedDict
from dataclasses import asdict, dataclass

from shelfsight.gateway.settings import CacheSettings

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


def make_key(image: bytes, question: str, system: str, params: dict, model_id: str, enhance: bool) -> CacheKey:
    context = hashlib.sha256(json.dumps(
        {"model": model_id, "question": normalize(question), "system": normalize(system or ""),
         "params": params, "enhance": bool(enhance)}, sort_keys=True).encode()).hexdigest()
    exact = hashlib.sha256(hashlib.sha256(image).digest() + context.encode()).hexdigest()
    return CacheKey(exact=exact, context=context)


def perceptual_hash(image: bytes, bits: int) -> int:
    """pHash of the picture as an int of `bits` bits (a square: 64 or 256).
    JPEGs decode in draft mode (DCT scaling): the hash only needs a few dozen pixels a side."""
    import imagehash
    from PIL import Image, ImageOps

    side = int(round(bits ** 0.5))
    with Image.open(io.BytesIO(image)) as im:
        im.draft("L", (side * 8, side * 8))
        im = ImageOps.exif_transpose(im).convert("L")
        h = imagehash.phash(im, hash_size=side)
    return int(str(h), 16)


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class MemoryStore:
    """Process-local store: LRU by bytes, TTL per entry, a per-context list of picture hashes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._entries: OrderedDict[str, tuple[bytes, float, str, int | None]] = OrderedDict()
        self._by_context: dict[str, dict[str, int]] = {}

    async def get(self, exact: str) -> bytes | None:
        item = self._entries.get(exact)
        if item is None:
            return None
        if item[1] < time.time():
            self._remove(exact)
            return None
        self._entries.move_to_end(exact)
        return item[0]

    async def nearest(self, context: str, phash: int, max_distance: int) -> tuple[str, int] | None:
        best = None
        for exact, h in list(self._by_context.get(context, {}).items()):
            d = distance(phash, h)
            if d <= max_distance and (best is None or d < best[1]):
                best = (exact, d)
        return best

    async def put(self, exact: str, context: str, phash: int | None, value: bytes, ttl: float) -> None:
        size = len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if exact in self._entries:
            self._remove(exact)
        while self.used + size > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))
        self._entries[exact] = (value, time.time() + ttl, context, phash)
        self.used += size
        if phash is not None:
            self._by_context.setdefault(context, {})[exact] = phash

    def _remove(self, exact: str) -> None:
        value, _, context, _ = self._entries.pop(exact)
        self.used -= len(value) + ENTRY_OVERHEAD
        hashes = self._by_context.get(context)
        if hashes is not None:
            hashes.pop(exact, None)
            if not hashes:
                del self._by_context[context]

    def stats(self) -> tuple[int, int]:
        return len(self._entries), self.used

    async def close(self) -> None:
        pass


class RedisStore:
    """Shared store for several gateways: answers as keys with a TTL, picture hashes per context in a
    hash. Redis's own maxmemory policy bounds its size."""

    def __init__(self, url: str, prefix: str = "shelfsight"):
        import redis.asyncio as redis

        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix

    async def get(self, exact: str) -> bytes | None:
        return await self.redis.get(f"{self.prefix}:x:{exact}")

    async def nearest(self, context: str, phash: int, max_distance: int) -> tuple[str, int] | None:
        index = f"{self.prefix}:p:{context}"
        best = None
        for exact, h in (await self.redis.hgetall(index)).items():
            d = distance(phash, int(h, 16))
            if d <= max_distance and (best is None or d < best[1]):
                best = (exact.decode(), d)
        if best and not await self.redis.exists(f"{self.prefix}:x:{best[0]}"):
            await self.redis.hdel(index, best[0])  # its answer expired: forget the hash too
            return await self.nearest(context, phash, max_distance)
        return best

    async def put(self, exact: str, context: str, phash: int | None, value: bytes, ttl: float) -> None:
        ms = max(1, int(ttl * 1000))
        pipe = self.redis.pipeline()
        pipe.set(f"{self.prefix}:x:{exact}", value, px=ms)
        if phash is not None:
            index = f"{self.prefix}:p:{context}"
            pipe.hset(index, exact, format(phash, "x"))
            pipe.pexpire(index, ms)
        await pipe.execute()

    def stats(self) -> tuple[int, int] | None:
        return None  # lives in Redis; see its INFO

    async def close(self) -> None:
        await self.redis.aclose()


@dataclass
class Probe:
    """What a lookup learned, reused when the answer is stored after a miss."""

    key: CacheKey
    phash: int | None = None


class ResultCache:
    def __init__(self, settings: CacheSettings, store=None):
        self.settings = settings
        self.store = store or (RedisStore(settings.redis_url) if settings.redis_url else MemoryStore(settings.max_bytes))

    async def lookup(self, probe: Probe, image: bytes, on_result) -> tuple[CachedAnswer, str] | None:
        """(answer, "exact" | "perceptual") or None. on_result(level, hit) reports each lookup."""
        raw = await self.store.get(probe.key.exact)
        on_result("exact", raw is not None)
        if raw is not None:
            return CachedAnswer.decode(raw), "exact"
        if not self.settings.perceptual:
            return None
        try:
            probe.phash = await asyncio.to_thread(perceptual_hash, image, self.settings.phash_bits)
        except Exception:  # a picture Pillow cannot read has no neighbours; Triton will say why
            on_result("perceptual", False)
            return None
        found = await self.store.nearest(probe.key.context, probe.phash, self.settings.max_distance)
        raw = await self.store.get(found[0]) if found else None
        on_result("perceptual", raw is not None)
        return (CachedAnswer.decode(raw), "perceptual") if raw is not None else None

    async def put(self, probe: Probe, image: bytes, answer: CachedAnswer) -> None:
        if self.settings.perceptual and probe.phash is None:
            try:
                probe.phash = await asyncio.to_thread(perceptual_hash, image, self.settings.phash_bits)
            except Exception:
                probe.phash = None
        await self.store.put(probe.key.exact, probe.key.context, probe.phash, answer.encode(),
                             self.settings.ttl_seconds)

    def stats(self):
        return self.store.stats()

    async def close(self) -> None:
        await self.store.close()
