"""Encoded image bytes -> an upright RGB picture, or a clear error naming what is wrong.

Formats: JPEG (and MPO, a camera JPEG), PNG, WebP, BMP, GIF (first frame). EXIF orientation is
applied; every mode becomes RGB: transparency is composited on white (as transformers' processor
does), CMYK and palette convert, 16-bit samples are scaled to 8 bits rather than clipped.
The pixel limit is checked from the header before anything is decompressed, so a decompression bomb
costs nothing.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from shelfsight.errors import InvalidArgument
from shelfsight.model import headers

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
Image.init()  # register every plugin now: `formats=` only finds decoders that are already loaded


@dataclass(frozen=True)
class PixelBounds:
    """The area a picture is resized into (Qwen's smart resize), in pixels of the resized picture."""
    min_pixels: int = 65_536  # 64 visual tokens
    max_pixels: int = 1_048_576  # 1,024 visual tokens; the real checkpoint allows 16 M (16,384 tokens)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # decoded width x height; refused before decompression
    max_aspect: float = 200.0  # Qwen's resize rule cannot handle more


def sniff(data: bytes) -> str | None:
    """The format named by the file's magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    return None


@dataclass(frozen=True)
class Encoded:
    """What the bytes alone say of a picture: its format and its pixel size (from the header)."""
    format: str
    width: int
    height: int
    progressive: bool = False  # a progressive JPEG (decoding holds every coefficient at full size)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def check_encoded(data: bytes, limits: ImageLimits) -> Encoded:
    """Cheap, bounded checks on the bytes alone (used at the gateway edge too): size, format, and the
    pixel size read from the header (shelfsight/model/headers.py), so that neither a decompression
    bomb nor a header Pillow would walk for seconds gets further."""
    if not data:
        raise InvalidArgument("image is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = sniff(data)
    if fmt is None:
        raise InvalidArgument("image is not a supported format (JPEG, PNG, WebP, BMP or GIF)")
    header = headers.read(data, fmt)
    _check_size(header.width, header.height, limits)
    return Encoded(fmt, *header)


def _check_size(w: int, h: int, limits: ImageLimits) -> None:
    if w < 1 or h < 1:
        raise InvalidArgument(f"image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels:
        raise InvalidArgument(f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels} "
                              "(read from its header: a decompression bomb is refused before decoding)")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise InvalidArgument(f"image aspect ratio {max(w, h) / min(w, h):.0f}:1 exceeds {limits.max_aspect:.0f}:1")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode as RGB the way the model sees it: transparency on white, 16-bit samples scaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples (Pillow opens 16-bit grey PNG/TIFF as I;16 or I): keep the top 8 bits
        arr = np.asarray(im, dtype=np.uint32)
        im = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode(data: bytes, limits: ImageLimits = ImageLimits(), enhance: bool = False) -> Image.Image:
    """Decode, orient and convert to RGB. Raises InvalidArgument naming the problem."""
    fmt = check_encoded(data, limits).format
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)  # its JPEG opener also yields camera MPO files
            _check_size(*im.size, limits)
            im.load()  # first frame only for GIF/WebP animations
        except InvalidArgument:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InvalidArgument(f"image looks like a decompression bomb; the limit is {limits.max_pixels} pixels") from None
        except UnidentifiedImageError:
            raise InvalidArgument(f"image starts like a {fmt} file but its header is not readable "
                                  "(corrupt or truncated)") from None
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
            # Pillow's messages may name the in-memory buffer (<_io.BytesIO object at 0x...>): noise to a client
            detail = OBJECT_REPR.sub("the data", str(e)).strip() or type(e).__name__
            raise InvalidArgument(f"{fmt} image could not be decoded: {detail}") from None
    try:
        im = ImageOps.exif_transpose(im)  # swaps width and height at most: the checks above still hold
    except Exception:  # a broken EXIF block must not cost the picture
        pass
    im = to_rgb(im)
    if enhance:  # the reference study's preprocessing
        im = ImageEnhance.Brightness(ImageEnhance.Contrast(im).enhance(1.2)).enhance(1.1)
    return im
