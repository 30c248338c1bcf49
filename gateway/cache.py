"""The result cache: exact and perceptual, in memory or shared through Redis.

Every key holds the model id, the normalized question and system prompt, the enhancement flag and the
*effective* generation parameters (defaults filled in), so an answer is never reused for another model,
question or setting: the failure peers shipped when they keyed on placeholder tokens (anchors.md).

    exact       sha256(image bytes) + context
    perceptual  the same context, a pHash within `max_distance` bits and a colour layout within
                `max_colour_distance` (see Signature)

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


@dataclass(frozen=True)
class Signature:
    """What a picture looks like, coarsely: its pHash (structure, grey levels) and a 4x4 RGB
    thumbnail (colour layout). A perceptual hit needs both to be near: on 300 product renders, pHash
    alone let 3 of 44,850 pairs of *different* products within 10 bits; none of those was within
    the colour bound, while re-encoded, resized and cropped copies stayed well below it."""

    phash: int
    colour: bytes  # 48 bytes: 4x4 pixels x RGB

    def encode(self) -> str:
        return f"{self.phash:x}:{self.colour.hex()}"

    @classmethod
    def decode(cls, text: str) -> "Signature":
        h, c = text.split(":")
        return cls(int(h, 16), bytes.fromhex(c))


def signature(image: bytes, bits: int) -> Signature:
    """pHash of `bits` bits (a square: 64 or 256) and the colour layout, from one decode."""
    import imagehash
    from PIL import Image, ImageOps

    side = int(round(bits ** 0.5))
    with Image.open(io.BytesIO(image)) as im:
        # Draft decoding keeps >= 512 px a side: a 12 MP JPEG decodes 4x smaller, cheaply. Drafting
        # further (to 128 px) made copies resized by 90% land on other DCT scales, and their hashes
        # apart: median distance 14 instead of 2 on product renders.
        im.draft("RGB", (512, 512))
        im = ImageOps.exif_transpose(im).convert("RGB")
        h = imagehash.phash(im.convert("L"), hash_size=side)
        colour = im.resize((4, 4), Image.BOX).tobytes()
    return Signature(int(str(h), 16), colour)


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def colour_distance(a: bytes, b: bytes) -> float:
    """Mean absolute difference of the two thumbnails, 0..255."""
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


def near(a: Signature, b: Signature, max_distance: int, max_colour: float) -> int | None:
    """pHash distance when both bounds hold, else None."""
    d = distance(a.phash, b.phash)
    return d if d <= max_distance and colour_distance(a.colour, b.colour) <= max_colour else None


class MemoryStore:
    """Process-local store: LRU by bytes, TTL per entry, a per-context list of picture hashes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._entries: OrderedDict[str, tuple[bytes, float, str, Signature | None]] = OrderedDict()
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

    async def nearest(self, context: str, sig: Signature, max_distance: int, max_colour: float) -> tuple[str, int] | None:
        best = None
        for exact, other in list(self._by_context.get(context, {}).items()):
            d = near(sig, other, max_distance, max_colour)
            if d is not None and (best is None or d < best[1]):
                best = (exact, d)
        return best

    async def put(self, exact: str, context: str, sig: Signature | None, value: bytes, ttl: float) -> None:
        size = len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if exact in self._entries:
            self._remove(exact)
        while self.used + size > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))
        self._entries[exact] = (value, time.time() + ttl, context, sig)
        self.used += size
        if sig is not None:
            self._by_context.setdefault(context, {})[exact] = sig

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

    async def nearest(self, context: str, sig: Signature, max_distance: int, max_colour: float) -> tuple[str, int] | None:
        index = f"{self.prefix}:p:{context}"
        best = None
        for exact, raw in (await self.redis.hgetall(index)).items():
            d = near(sig, Signature.decode(raw.decode()), max_distance, max_colour)
            if d is not None and (best is None or d < best[1]):
                best = (exact.decode(), d)
        if best and not await self.redis.exists(f"{self.prefix}:x:{best[0]}"):
            await self.redis.hdel(index, best[0])  # its answer expired: forget the signature too
            return await self.nearest(context, sig, max_distance, max_colour)
        return best

    async def put(self, exact: str, context: str, sig: Signature | None, value: bytes, ttl: float) -> None:
        ms = max(1, int(ttl * 1000))
        pipe = self.redis.pipeline()
        pipe.set(f"{self.prefix}:x:{exact}", value, px=ms)
        if sig is not None:
            index = f"{self.prefix}:p:{context}"
            pipe.hset(index, exact, sig.encode())
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
    signature: Signature | None = None


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
            probe.signature = await asyncio.to_thread(signature, image, self.settings.phash_bits)
        except Exception:  # a picture Pillow cannot read has no neighbours; Triton will say why
            on_result("perceptual", False)
            return None
        found = await self.store.nearest(probe.key.context, probe.signature, self.settings.max_distance,
                                         self.settings.max_colour_distance)
        raw = await self.store.get(found[0]) if found else None
        on_result("perceptual", raw is not None)
        return (CachedAnswer.decode(raw), "perceptual") if raw is not None else None

    async def put(self, probe: Probe, image: bytes, answer: CachedAnswer) -> None:
        if self.settings.perceptual and probe.signature is None:
            try:
                probe.signature = await asyncio.to_thread(signature, image, self.settings.phash_bits)
            except Exception:
                probe.signature = None
        await self.store.put(probe.key.exact, probe.key.context, probe.signature, answer.encode(),
                             self.settings.ttl_seconds)

    def stats(self):
        return self.store.stats()

    async def close(self) -> None:
        await self.store.close()
