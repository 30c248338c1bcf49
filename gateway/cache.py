"""The result cache: exact and perceptual, in memory or shared through Redis.

Every key holds the model id, the normalized question and system prompt, the enhancement flag and the
*effective* generation parameters (defaults filled in), so an answer is never reused for another model,
question or setting: the failure peers shipped when they keyed on placeholder tokens (anchors.md).

    exact       sha256(image bytes) + context
    perceptual  the same context, a pHash within `max_distance` bits and a colour layout within
                `max_colour_distance` (see Signature) find *candidates*; one is served only when the
                two pictures agree everywhere, pixel by pixel after alignment (see `difference`):
                the hash alone served the answer for "$4.99" to a photo of "$9.99".

Only complete, successful answers are stored (the service decides what qualifies).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import time
import unicodedata
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

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


def decode_picture(image: bytes):
    """The picture as Pillow RGB, upright, decoded at >= 512 px a side: what signatures and thumbnails
    are made from."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image)) as im:
        # Draft decoding keeps >= 512 px a side: a 12 MP JPEG decodes 4x smaller, cheaply. Drafting
        # further (to 128 px) made copies resized by 90% land on other DCT scales, and their hashes
        # apart: median distance 14 instead of 2 on product renders.
        im.draft("RGB", (512, 512))
        return ImageOps.exif_transpose(im).convert("RGB")


def signature_of(picture, bits: int) -> Signature:
    """pHash of `bits` bits (a square: 64 or 256) and the colour layout of a decoded picture."""
    import imagehash
    from PIL import Image

    h = imagehash.phash(picture.convert("L"), hash_size=int(round(bits ** 0.5)))
    return Signature(int(str(h), 16), picture.resize((4, 4), Image.BOX).tobytes())


def signature(image: bytes, bits: int) -> Signature:
    return signature_of(decode_picture(image), bits)


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def colour_distance(a: bytes, b: bytes) -> float:
    """Mean absolute difference of the two thumbnails, 0..255."""
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


def near(a: Signature, b: Signature, max_distance: int, max_colour: float) -> tuple[float, int] | None:
    """(colour distance, pHash distance) when both bounds hold, else None. Sorted, nearest colour
    first: a 1% crop moves the colour layout by <= 2.2 but the pHash of a flat render by up to 104 bits."""
    d, c = distance(a.phash, b.phash), colour_distance(a.colour, b.colour)
    return (c, d) if d <= max_distance and c <= max_colour else None


# ---- verification: does the candidate show what the query shows, everywhere? ----
# A hash summarises the whole picture, so a changed price moves it by a bit or two. The check compares
# grey thumbnails at up to 512 px a side (a 640 px photo is seen by the model at 640: a 24 px digit is
# still ~19 px here), after undoing up to 2% of scale and shift per axis (crops of <= 1%, resizes),
# and takes the *worst pixel*, not a mean: a changed digit changes a small region strongly.
BLUR = 0.6  # px, both sides: a copy resized to 80% and the original reach 512 px through different
            # filters; the blur evens that out (copies' worst pixel 26 -> 20) and keeps glyph changes (>= 31)
REACH = 0.02  # largest scale and shift (fraction of the side) the alignment tries
CONTRAST = 128  # grey levels: how much the local range weighs (see `difference`)


@dataclass(frozen=True)
class Thumbnail:
    pixels: np.ndarray  # (h, w) uint8, long side = the settings' verify_side, blurred by BLUR

    def encode(self) -> bytes:
        h, w = self.pixels.shape
        return struct.pack("<HH", h, w) + zlib.compress(self.pixels.tobytes(), 1)

    @classmethod
    def decode(cls, raw: bytes) -> "Thumbnail":
        h, w = struct.unpack("<HH", raw[:4])
        return cls(np.frombuffer(zlib.decompress(raw[4:]), np.uint8).reshape(h, w))


def _grey(picture, size: tuple[int, int], box=None) -> np.ndarray:
    from PIL import Image
    from scipy import ndimage

    small = np.asarray(picture.convert("L").resize(size, Image.BILINEAR, box=box), np.float32)
    return ndimage.gaussian_filter(small, BLUR)


def thumbnail(picture, side: int) -> Thumbnail:
    w, h = picture.size
    f = min(1.0, side / max(w, h))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return Thumbnail(np.clip(np.rint(_grey(picture, size)), 0, 255).astype(np.uint8))


def _align(q: np.ndarray, r: np.ndarray) -> list[tuple[float, float]]:
    """Per axis (y, x), the scale s and shift t (px) with r(c + s(x - c) + t) ~ q(x), c the centre:
    a coarse-to-fine grid search on the mean row and column profiles. A 1% crop is a 1% scale plus a
    shift; the fine step leaves <= 0.25 px of error at the edges."""
    out = []
    for axis in (0, 1):
        pq, pr = q.mean(axis=1 - axis), r.mean(axis=1 - axis)
        n = len(pq)
        m = int(np.ceil(REACH * n)) + 2  # where every tried (s, t) stays inside r
        x = np.arange(m, n - m, dtype=np.float32) + 0.5 - n / 2
        best_s, best_t = 1.0, 0.0
        for s_step, t_step, s_span, t_span in ((REACH / 4, 1.0, REACH, REACH * n), (REACH / 16, 0.25, REACH / 4, 1.0)):
            s = np.arange(best_s - s_span, best_s + s_span + s_step / 2, s_step, dtype=np.float32)
            t = np.arange(best_t - t_span, best_t + t_span + t_step / 2, t_step, dtype=np.float32)
            at = x[None, None, :] * s[:, None, None] + t[None, :, None] + n / 2 - 0.5  # (S, T, X) positions in r
            cost = ((np.interp(at, np.arange(n), pr) - pq[m:n - m]) ** 2).mean(axis=2)
            i, j = np.unravel_index(np.argmin(cost), cost.shape)
            best_s, best_t = float(s[i]), float(t[j])
        out.append((best_s, best_t))
    return out


def _envelope_excess(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How far each pixel of a lies outside what b takes within half a pixel (b and its bilinear values
    half-way to each of its 8 neighbours: (b + min or max of the 3x3) / 2). Alignment is good to
    ~0.3 px, so this forgives sub-pixel error and nothing more."""
    lo, hi = (b + _filter3(b, np.minimum)) / 2, (b + _filter3(b, np.maximum)) / 2
    return np.maximum(0, np.maximum(a - hi, lo - a))


def _filter3(b: np.ndarray, op) -> np.ndarray:
    """op (np.minimum / np.maximum) over each 3x3 neighbourhood, edges repeated."""
    p = np.pad(b, 1, mode="edge")
    rows = op(op(p[:-2], p[1:-1]), p[2:])
    return op(op(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def difference(picture, stored: Thumbnail) -> float:
    """The largest disagreement between a decoded picture and a stored thumbnail, after alignment:
    grey levels outside what the other side takes within half a pixel, weighed by local contrast
    (0 .. ~3x255), ignoring a 3% border (what a <= 1% crop removes or adds)."""
    from PIL import ImageOps

    r = stored.pixels.astype(np.float32)
    h, w = r.shape
    if min(h, w) < 32:  # too small to align and compare: never vouch for it
        return float("inf")
    (sy, ty), (sx, tx) = _align(_grey(picture, (w, h)), r)
    # Resample the picture itself onto the thumbnail's grid, moved by the alignment, so that both sides
    # are filtered with the same phase (resampling the thumbnail instead smeared its thin lines).
    W, H = picture.size
    pad = int(np.ceil(REACH * 1.5 * max(W, H))) + 2
    fx, fy = W / w, H / h
    x0, x1 = ((X - w / 2 - tx) / sx + w / 2 for X in (0, w))
    y0, y1 = ((Y - h / 2 - ty) / sy + h / 2 for Y in (0, h))
    q = _grey(ImageOps.expand(picture, pad), (w, h), box=(x0 * fx + pad, y0 * fy + pad, x1 * fx + pad, y1 * fy + pad))
    # A query with fewer pixels than the grid was enlarged onto it: interpolation smoothed it and it
    # lacks the stored side's fine detail (noise, edges). Blur both to the query's resolution (measured
    # on noisy 480 px renders: 97% copies 31 -> 18, 90% 40 -> 15, 80% 46 -> 11).
    enlarged = max(w / W, h / H)
    if enlarged > 1:
        from scipy import ndimage

        extra = max(0.8, 3 * BLUR * np.sqrt(enlarged ** 2 - 1))
        q, r = ndimage.gaussian_filter(q, extra), ndimage.gaussian_filter(r, extra)
    excess = np.maximum(_envelope_excess(q, r), _envelope_excess(r, q))
    # Weighed by the local contrast (5x5 range of both): a changed glyph in white on yellow differs by
    # ~22 grey levels of a 63-level range, while re-sampled edges and noise of copies reach ~22 where
    # the range is ~200. Full-range excess counts as is, flat-region excess up to 3x.
    span = _filter3(_filter3(np.maximum(q, r), np.maximum), np.maximum) - \
        _filter3(_filter3(np.minimum(q, r), np.minimum), np.minimum)
    score = excess * (255 + CONTRAST) / (span + CONTRAST)
    my, mx = int(np.ceil(0.03 * h)) + 1, int(np.ceil(0.03 * w)) + 1
    return float(score[my:h - my, mx:w - mx].max(initial=0.0))


def _nearest_first(found: list[tuple[tuple[float, int], str]]) -> list[str]:
    return [exact for _, exact in sorted(found)]


class MemoryStore:
    """Process-local store: LRU by bytes (answers and thumbnails), TTL per entry, a per-context list of
    picture hashes."""

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
        found = [(d, exact) for exact, other in list(self._by_context.get(context, {}).items())
                 if (d := near(sig, other, max_distance, max_colour)) is not None]
        return _nearest_first(found)

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

    def stats(self) -> tuple[int, int]:
        return len(self._entries), self.used

    async def close(self) -> None:
        pass


class RedisStore:
    """Shared store for several gateways: answers and thumbnails as keys with a TTL, picture hashes per
    context in a hash. Redis's own maxmemory policy bounds its size."""

    def __init__(self, url: str, prefix: str = "shelfsight"):
        import redis.asyncio as redis

        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix

    async def get(self, exact: str) -> bytes | None:
        return await self.redis.get(f"{self.prefix}:x:{exact}")

    async def thumbnail(self, exact: str) -> bytes | None:
        return await self.redis.get(f"{self.prefix}:t:{exact}")

    async def candidates(self, context: str, sig: Signature, max_distance: int, max_colour: float) -> list[str]:
        index = f"{self.prefix}:p:{context}"
        found = [(d, exact.decode()) for exact, raw in (await self.redis.hgetall(index)).items()
                 if (d := near(sig, Signature.decode(raw.decode()), max_distance, max_colour)) is not None]
        pipe = self.redis.pipeline()
        for _, exact in found:
            pipe.exists(f"{self.prefix}:x:{exact}")
        live = await pipe.execute() if found else []
        gone = [exact for (_, exact), ok in zip(found, live) if not ok]
        if gone:  # their answers expired: forget their signatures too
            await self.redis.hdel(index, *gone)
        found = [f for f, ok in zip(found, live) if ok]
        return _nearest_first(found)

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
    picture: object = None  # the decoded picture (Pillow, grey) until the answer is stored


class ResultCache:
    MAX_CANDIDATES = 4  # candidates verified per lookup, nearest hash first

    def __init__(self, settings: CacheSettings, store=None):
        self.settings = settings
        self.store = store or (RedisStore(settings.redis_url) if settings.redis_url else MemoryStore(settings.max_bytes))

    def _examine(self, probe: Probe, image: bytes) -> None:
        picture = decode_picture(image)
        probe.signature = signature_of(picture, self.settings.phash_bits)
        probe.picture = picture.convert("L")  # all the check and the thumbnail need: a third of the bytes

    async def lookup(self, probe: Probe, image: bytes, on_result) -> tuple[CachedAnswer, str] | None:
        """(answer, "exact" | "perceptual") or None. on_result(level, hit) reports each lookup."""
        raw = await self.store.get(probe.key.exact)
        on_result("exact", raw is not None)
        if raw is not None:
            return CachedAnswer.decode(raw), "exact"
        if not self.settings.perceptual:
            return None
        try:
            await asyncio.to_thread(self._examine, probe, image)
        except Exception:  # a picture Pillow cannot read has no neighbours; Triton will say why
            on_result("perceptual", False)
            return None
        s = self.settings
        found = await self.store.candidates(probe.key.context, probe.signature, s.max_distance, s.max_colour_distance)
        for exact in found[:self.MAX_CANDIDATES]:
            if s.verify and not await self._same_picture(probe, exact):
                continue
            raw = await self.store.get(exact)
            if raw is not None:
                on_result("perceptual", True)
                return CachedAnswer.decode(raw), "perceptual"
        on_result("perceptual", False)
        return None

    async def _same_picture(self, probe: Probe, exact: str) -> bool:
        raw = await self.store.thumbnail(exact)
        if raw is None:  # stored without one (verification was off): cannot be vouched for
            return False
        try:
            return await asyncio.to_thread(difference, probe.picture, Thumbnail.decode(raw)) <= self.settings.max_difference
        except Exception:  # a damaged entry is a miss, never a failed request
            return False

    async def put(self, probe: Probe, image: bytes, answer: CachedAnswer) -> None:
        thumb = None
        if self.settings.perceptual:
            try:
                if probe.picture is None:
                    await asyncio.to_thread(self._examine, probe, image)
                if self.settings.verify:
                    thumb = (await asyncio.to_thread(thumbnail, probe.picture, self.settings.verify_side)).encode()
            except Exception:
                probe.signature = None
        probe.picture = None  # the answer is stored: the decoded picture is not needed any more
        await self.store.put(probe.key.exact, probe.key.context, probe.signature, answer.encode(),
                             self.settings.ttl_seconds, thumb)

    def stats(self):
        return self.store.stats()

    async def close(self) -> None:
        await self.store.close()
