"""What makes two pictures the same for the model: the coarse signature that proposes cache candidates
(pHash + colour layout), and the pixel-level check that decides (a stored grey thumbnail, aligned and
compared at its worst pixel). gateway/cache.py stores and looks up; this module only compares.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np


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
