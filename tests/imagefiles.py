"""Encoded test pictures of every kind preprocessing must handle, made with Pillow on the fly."""
from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

from shelfsight import synth


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A product render of the given size (structure, text and noise: not a flat colour)."""
    rng = random.Random(seed)
    # render on a canvas the drawing fits (at least 200 px a side), then resize to the wanted shape
    canvas = (max(w, 200), max(h, 200))
    img = synth.render(synth.make_product(rng), size=canvas, seed=seed)
    return img if canvas == (w, h) else img.resize((w, h), Image.BICUBIC)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int) -> bytes:
    img = photo(320, 200, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=92, exif=exif.tobytes())


def png16() -> bytes:
    ramp = (np.arange(160 * 96, dtype=np.uint32).reshape(96, 160) * 4099 % 65536).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(photo(300, 260, seed=4).convert("CMYK"), "JPEG", quality=90)


def palette_transparent_png() -> bytes:
    p = photo(200, 180, seed=5).convert("P", palette=Image.ADAPTIVE, colors=64)
    p.info["transparency"] = 3
    return encode(p, "PNG", transparency=3)


def rgba_png() -> bytes:
    img = photo(240, 240, seed=6).convert("RGBA")
    alpha = Image.linear_gradient("L").resize(img.size)
    img.putalpha(alpha)
    return encode(img, "PNG")


def la_png() -> bytes:
    img = photo(128, 200, seed=7).convert("LA")
    return encode(img, "PNG")


def animated_gif() -> bytes:
    frames = [photo(160, 120, seed=s).convert("P", palette=Image.ADAPTIVE) for s in (8, 9)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    raw = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return raw[:8] + patched + raw[8 + 4 + 4 + 13 + 4:]


def variety() -> dict[str, bytes]:
    """name -> encoded bytes: the preprocessing parity corpus."""
    cases = {
        "1x1": encode(photo(1, 1), "PNG"),
        "tiny-5x7": encode(photo(5, 7), "PNG"),
        "jpeg-448": encode(photo(448, 448, 1), "JPEG", quality=90),
        "jpeg-1024x768": encode(photo(1024, 768, 2), "JPEG", quality=85),
        "jpeg-large-3000x2000": encode(photo(3000, 2000, 3), "JPEG", quality=80),
        "tall-30x3000": encode(photo(30, 3000, 4), "PNG"),
        "wide-4000x21": encode(photo(4000, 21, 5), "PNG"),
        "odd-333x517": encode(photo(333, 517, 6), "WEBP", quality=90),
        "bmp-250x190": encode(photo(250, 190, 7), "BMP"),
        "gray-jpeg": encode(photo(400, 300, 8).convert("L"), "JPEG"),
        "bilevel-png": encode(photo(300, 300, 9).convert("1"), "PNG"),
        "cmyk-jpeg": cmyk_jpeg(),
        "palette-png": encode(photo(260, 200, 10).convert("P", palette=Image.ADAPTIVE), "PNG"),
        "palette-transparent-png": palette_transparent_png(),
        "rgba-png": rgba_png(),
        "la-png": la_png(),
        "png-16bit": png16(),
        "gif-animated": animated_gif(),
    }
    for orientation in (3, 6, 8):
        cases[f"exif-orientation-{orientation}"] = exif_rotated_jpeg(orientation)
    return cases
