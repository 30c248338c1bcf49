"""What makes two pictures the same for the model: the coarse signature that proposes cache candidates
(pHash + colour layout), and the pixel-level check that decides (a stored thumbnail of grey levels and
OKLab colour, aligned and compared at its worst pixel). gateway/cache.py stores and looks up; this module
only compares.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from shelfsight.model.imaging import FORMATS, Encoded, to_rgb


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


KEEP_SIDE = 1024  # px: the long side a picture is decoded at (or just above) and the finest check
# The check must see what the model sees: its thumbnail has the long side of the model's own view of the
# picture (view_side), >= the settings' verify_side and <= KEEP_SIDE, and a stored thumbnail vouches only
# for a picture the model sees at <= 1/FINEST of its side. At 512 px for every picture, a 3000 px photo
# (seen by the model at 1024) lost 12 px print in the check: "PRICE $7.49" got "$1.99"'s answer.
FINEST = 0.8  # the coarsest check per model pixel: what an 80% resize of a copy is compared at


def view_side(width: int, height: int, max_pixels: int) -> float:
    """The long side, in px, of the picture as the model sees it: Qwen's resize brings a picture over
    `max_pixels` down to that area, and one under it gains no detail when it is enlarged."""
    return max(width, height) * min(1.0, (max_pixels / max(1, width * height)) ** 0.5)


def check_side(view: float, verify_side: int) -> int:
    """The long side a picture's thumbnail is made at: the model's view, bounded by verify_side and
    KEEP_SIDE (past KEEP_SIDE / FINEST the picture cannot be vouched for at all)."""
    return int(min(KEEP_SIDE, max(verify_side, round(view))))


def checkable(view: float) -> bool:
    """Can a thumbnail of at most KEEP_SIDE see this picture finely enough?"""
    return FINEST * view <= KEEP_SIDE


def _draft_scale(width: int, height: int) -> int:
    """The DCT scale (1, 2, 4, 8) a JPEG is decoded at: the coarsest that keeps the long side >= KEEP_SIDE."""
    for scale in (8, 4, 2):
        if max(width, height) // scale >= KEEP_SIDE:
            return scale
    return 1


def decode_picture(image: bytes, max_pixels: int | None = None):
    """The picture as RGB the way the model sees it (imaging.to_rgb: transparency on white, 16-bit
    samples scaled), upright, decoded at a long side of >= KEEP_SIDE where it has one and reduced by a
    whole factor to less than 2 x KEEP_SIDE: what signatures and thumbnails are made from. Its
    info["source"] is the picture's own (width, height), which the model's view is computed from.
    `max_pixels`: what the header said (imaging.check_encoded); a picture that opens larger (a GIF whose
    frame outgrows its screen) is refused before decoding."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image), formats=FORMATS) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise ValueError(f"opens as {im.width}x{im.height}, more than its header said")
        source = im.size
        # Draft decoding keeps the long side >= KEEP_SIDE: a 12 MP JPEG decodes 2x smaller a side,
        # cheaply, and still as finely as the model sees it. (Drafting to 128 px made copies resized by
        # 90% land on other DCT scales, and their hashes apart: median distance 14 instead of 2.)
        scale = _draft_scale(*source)
        im.draft("RGB", (max(1, source[0] // scale), max(1, source[1] // scale)))  # (decodes to ceil(side / scale))
        im.load()
        # Reduced first, by a whole factor (a cheap box filter), so that orienting and converting copy
        # the small picture: each of them copies even when there is nothing to do (3 x 108 MB for a 36 MP
        # PNG). What is kept while the model answers is the thumbnail alone.
        factor = max(im.size) // KEEP_SIDE
        small = im.reduce(factor) if factor > 1 and im.mode in ("RGB", "L", "RGBA", "LA") else im
        try:  # turned upright before to_rgb, which drops the EXIF of RGBA, palette and 16-bit pictures
            small = ImageOps.exif_transpose(small)  # (as the model's decode does: imaging.decode)
        except Exception:  # a broken EXIF block must not cost the picture
            pass
        upright = to_rgb(small)
    if max(upright.size) >= 2 * KEEP_SIDE:  # a mode reduce() does not take (palette, 16-bit): converted first
        upright = upright.reduce(max(upright.size) // KEEP_SIDE)
    upright.info["source"] = source
    return upright


def decoded_pixels(encoded: Encoded) -> int:
    """Pixels `decode_picture` holds at its peak, in RGB pixels, for a picture of this header."""
    w, h = encoded.width, encoded.height
    if encoded.format == "JPEG":
        if encoded.progressive:  # libjpeg keeps every DCT coefficient (2 bytes, full size) whatever the draft:
            return 2 * w * h     # a 6000x6000 progressive JPEG grew RSS by 209 MB, a baseline one by 5 MB
        scale = _draft_scale(w, h)
        return -(-w // scale) * -(-h // scale)
    return w * h


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
# thumbnails at the model's view of the picture (check_side: 512-1024 px; the constants below were
# first tuned at 512 and measured again at the model's view by bench/perceptual_pairs.py), after
# undoing up to 2% of scale and shift per axis (crops of <= 1%, resizes), and takes the *worst pixel*,
# not a mean: a changed digit or a recoloured cap changes a small region strongly. Three planes are compared: grey (luma: where print is) and OKLab's a and b (colour at
# the same grey level: a lipstick shade, a cap, a logo, the other SKU of the same photo).
BLUR = 0.6  # px, both sides: a copy resized to 80% and the original reach 512 px through different
            # filters; the blur evens that out (copies' worst pixel 26 -> 20) and keeps glyph changes (>= 31)
# Colour is compared on a grid of half the thumbnail's side: JPEG keeps it at half resolution (4:2:0)
# anyway, and a changed region of 1.6% of a 640 px picture is still ~32 px wide there.
CHROMA_BLUR = 0.75  # px of that grid: copies differ at colour edges by a pixel or two
REACH = 0.02  # largest scale and shift (fraction of the side) the alignment tries
CONTRAST = 128  # grey levels: how much the local range weighs (see `difference`)
CHROMA_SCALE = 400.0  # OKLab a, b (about -0.3..0.3) stored as uint8 128 + 400 x
# An OKLab colour distance of 0.0025 (one stored unit) weighs as CHROMA_WEIGHT grey levels, so the served
# bound (47) is an a-b distance of 47 / 3 / 400 = 0.039: copies reach 0.026, changed regions >= 0.082
# (bench/perceptual_pairs.py, 3,384 copies, 72 colour pairs).
CHROMA_WEIGHT = 3.0
FAINT_BLUR = 0.7  # px: about a stroke of 12-16 px print at 512 px
FAINT_CONTRAST = 32  # grey levels: the faint-print residual weighs up to 9x where the local range is flat
# The residual is served up to 52: copies reach 50.9 (bench/perceptual_pairs.py, 3,384 copies), changed
# faint print 23.7-80 (19 of 24 above 52).
FAINT_WEIGHT = 47 / 52
MAGIC = b"SL3"  # grey + half-size a, b; anything else (the old grey-only ones) is never vouched for


@dataclass(frozen=True)
class Thumbnail:
    grey: np.ndarray  # (h, w) uint8, long side = check_side (or the picture's own, when smaller), blurred by BLUR
    chroma: np.ndarray  # (2, h2, w2) uint8: OKLab a, b x CHROMA_SCALE + 128 on the half grid

    def encode(self) -> bytes:
        h, w = self.grey.shape
        return MAGIC + struct.pack("<HH", h, w) + zlib.compress(self.grey.tobytes() + self.chroma.tobytes(), 1)

    @classmethod
    def decode(cls, raw: bytes) -> "Thumbnail | None":
        """The thumbnail, or None for one stored in another format (it cannot vouch for colour)."""
        if not raw.startswith(MAGIC):
            return None
        h, w = struct.unpack("<HH", raw[3:7])
        w2, h2 = half((w, h))
        flat = np.frombuffer(zlib.decompress(raw[7:]), np.uint8)
        return cls(flat[:h * w].reshape(h, w), flat[h * w:].reshape(2, h2, w2))


def half(size: tuple[int, int]) -> tuple[int, int]:
    return max(1, round(size[0] / 2)), max(1, round(size[1] / 2))


_M1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566],
                [0.0883024619, 0.2817188376, 0.6299787005]], np.float32)
_M2AB = np.array([[1.9779984951, -2.4285922050, 0.4505937099],
                  [0.0259040371, 0.7827717662, -0.8086757660]], np.float32)  # OKLab's a, b rows
_LINEAR = ((np.arange(256, dtype=np.float64) / 255 + 0.055) / 1.055) ** 2.4
_LINEAR[:11] = np.arange(11) / 255 / 12.92  # sRGB decoding for every 8-bit value (c <= 0.04045)
_LINEAR = _LINEAR.astype(np.float32)


def _grey(picture, size: tuple[int, int], box=None) -> np.ndarray:
    """(h, w) float32 grey levels, resampled onto `size` (from `box`) and blurred by BLUR."""
    from PIL import Image
    from scipy import ndimage

    small = picture.convert("L").resize(size, Image.BILINEAR, box=box)
    return ndimage.gaussian_filter(np.asarray(small, np.float32), BLUR)


def _chroma(picture, size: tuple[int, int], box=None) -> np.ndarray:
    """(2, h, w) float32: OKLab a and b x CHROMA_SCALE, resampled onto `size`, blurred by CHROMA_BLUR."""
    from PIL import Image
    from scipy import ndimage

    rgb = _LINEAR[np.asarray(picture.convert("RGB").resize(size, Image.BILINEAR, box=box))]  # linear light
    ab = np.moveaxis(np.cbrt(rgb @ _M1.T) @ _M2AB.T, -1, 0) * CHROMA_SCALE
    return ndimage.gaussian_filter(ab, (0, CHROMA_BLUR, CHROMA_BLUR))


def thumbnail(picture, side: int) -> Thumbnail:
    w, h = picture.size
    f = min(1.0, side / max(w, h))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    grey = np.clip(np.rint(_grey(picture, size)), 0, 255).astype(np.uint8)
    return Thumbnail(grey, np.clip(np.rint(_chroma(picture, half(size)) + 128), 0, 255).astype(np.uint8))


def _align(q: np.ndarray, r: np.ndarray) -> list[tuple[float, float]]:
    """Per axis (y, x), the scale s and shift t (px) with r(c + s(x - c) + t) ~ q(x), c the centre:
    a coarse-to-fine grid search on the mean row and column profiles of the grey planes. A 1% crop
    is a 1% scale plus a shift; the fine step leaves <= 0.25 px of error at the edges."""
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
            # Among equal costs (a picture uniform along this axis says nothing of its scale or shift) the
            # one nearest the current guess: the first of the grid would be its edge, 2% off.
            ties = cost <= cost.min() + 1e-6 * max(1.0, float(cost.min()))
            away = ((s[:, None] - best_s) / REACH) ** 2 + ((t[None, :] - best_t) / (REACH * n)) ** 2
            i, j = np.unravel_index(np.argmin(np.where(ties, away, np.inf)), cost.shape)
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


def _excess(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(_envelope_excess(q, r), _envelope_excess(r, q))


def difference(picture, stored: Thumbnail | None, grey_only: bool = False) -> float:
    """The largest disagreement between a decoded picture and a stored thumbnail, after alignment, in
    grey levels (0 .. ~3x255), ignoring a 3% border (what a <= 1% crop removes or adds): the largest of
    - grey levels outside what the other side takes within half a pixel, weighed by local contrast;
    - the OKLab colour difference outside that envelope (x CHROMA_WEIGHT);
    - the faint-print residual (x FAINT_WEIGHT, see `disagreement`).
    grey_only=True is the first alone: the rule before colour and faint print were compared, kept to
    measure against (bench/perceptual_pairs.py), not to run."""
    grey, chroma, faint = disagreement(picture, stored)
    return grey if grey_only else max(grey, CHROMA_WEIGHT * chroma, FAINT_WEIGHT * faint)


def disagreement(picture, stored: Thumbnail | None) -> tuple[float, float, float]:
    """(worst weighed grey excess, worst OKLab colour excess x CHROMA_SCALE, worst weighed faint-print
    residual); inf where the stored side cannot vouch (another format, or too small to align)."""
    from PIL import ImageOps
    from scipy import ndimage

    if stored is None:
        return (float("inf"),) * 3
    r = stored.grey.astype(np.float32)
    rc = stored.chroma.astype(np.float32) - 128
    h, w = r.shape
    if min(h, w) < 32:  # too small to align and compare: never vouch for it
        return (float("inf"),) * 3
    luma = picture.convert("L")  # once: the alignment and the grey plane both start from it
    (sy, ty), (sx, tx) = _align(_grey(luma, (w, h)), r)
    # Resample the picture itself onto the thumbnail's grid, moved by the alignment, so that both sides
    # are filtered with the same phase (resampling the thumbnail instead smeared its thin lines).
    W, H = picture.size
    pad = int(np.ceil(REACH * 1.5 * max(W, H))) + 2
    fx, fy = W / w, H / h
    x0, x1 = ((X - w / 2 - tx) / sx + w / 2 for X in (0, w))
    y0, y1 = ((Y - h / 2 - ty) / sy + h / 2 for Y in (0, h))
    box = (x0 * fx + pad, y0 * fy + pad, x1 * fx + pad, y1 * fy + pad)
    q, qc = _grey(ImageOps.expand(luma, pad), (w, h), box), _chroma(ImageOps.expand(picture, pad), rc.shape[:0:-1], box)
    # A query with fewer pixels than the grid was enlarged onto it: interpolation smoothed it and it
    # lacks the stored side's fine detail (noise, edges). Blur both to the query's resolution (measured
    # on noisy 480 px renders: 97% copies 31 -> 18, 90% 40 -> 15, 80% 46 -> 11).
    enlarged = max(w / W, h / H)
    if enlarged > 1:
        extra = max(0.8, 3 * BLUR * np.sqrt(enlarged ** 2 - 1))
        q, r = ndimage.gaussian_filter(q, extra), ndimage.gaussian_filter(r, extra)
        qc, rc = (ndimage.gaussian_filter(x, (0, extra / 2, extra / 2)) for x in (qc, rc))
    grey = _excess(q, r)
    # Weighed by the local contrast (5x5 range of both): a changed glyph in white on yellow differs by
    # ~22 grey levels of a 63-level range, while re-sampled edges and noise of copies reach ~22 where
    # the range is ~200. Full-range excess counts as is, flat-region excess up to 3x.
    hi, lo = np.maximum(q, r), np.minimum(q, r)
    span = _filter3(_filter3(hi, np.maximum), np.maximum) - _filter3(_filter3(lo, np.minimum), np.minimum)
    score = grey * (255 + CONTRAST) / (span + CONTRAST)
    # Faint print (12-16 px, 25-35 grey levels of contrast): at 512 px its strokes are ~1 px and the
    # half-pixel envelope forgives half of what is left, so a changed digit scored 9-44, copies up to 42.
    # The signed difference, smoothed over a stroke's width, keeps a stroke that is on one side only
    # (one sign along it) and cancels what resampling and JPEG leave (signs that alternate across an
    # edge or a block); weighed like the grey excess, more steeply (FAINT_CONTRAST).
    residual = np.abs(ndimage.gaussian_filter(q - r, FAINT_BLUR)) * (255 + FAINT_CONTRAST) / (span + FAINT_CONTRAST)
    chroma = np.hypot(_excess(qc[0], rc[0]), _excess(qc[1], rc[1]))
    return _inner_max(score), _inner_max(chroma), _inner_max(residual)


def _inner_max(x: np.ndarray) -> float:
    """The largest value inside a 3% border (what a <= 1% crop removes or adds)."""
    h, w = x.shape
    my, mx = int(np.ceil(0.03 * h)) + 1, int(np.ceil(0.03 * w)) + 1
    return float(x[my:h - my, mx:w - mx].max(initial=0.0))
