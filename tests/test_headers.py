"""The header walk (shelfsight/model/headers.py): the pixel size Pillow would report, for every format
and mode the service reads, and a bounded refusal for headers that Pillow would walk for seconds."""
from __future__ import annotations

import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from shelfsight.errors import InvalidArgument
from shelfsight.model import headers, imaging
from tests import imagefiles

# (format, modes it can store, save options drawn per picture)
SAVES = {
    "JPEG": (("RGB", "L", "CMYK"), lambda rng: dict(quality=rng.choice((60, 90)), progressive=rng.random() < 0.5,
                                                    subsampling=rng.choice((0, 2)))),
    "PNG": (("RGB", "L", "RGBA", "P", "1", "LA", "I;16"), lambda rng: {}),
    "WEBP": (("RGB", "RGBA"), lambda rng: dict(lossless=rng.random() < 0.5, quality=80)),
    "BMP": (("RGB", "L", "P", "1"), lambda rng: {}),
    "GIF": (("P", "L"), lambda rng: dict(comment=b"x" * rng.randrange(0, 2000))),
}


def pictures(seed: int = 0, per_mode: int = 5):
    rng = random.Random(seed)
    for fmt, (modes, options) in SAVES.items():
        for mode in modes:
            for _ in range(per_mode):
                w, h = rng.randint(1, 1200), rng.randint(1, 1200)
                buf = io.BytesIO()
                Image.new(mode, (w, h)).save(buf, format=fmt, **options(rng))
                yield f"{fmt} {mode} {w}x{h}", buf.getvalue()


def test_sizes_agree_with_pillow_for_every_format_and_mode():
    seen = 0
    for name, data in pictures():
        assert headers.dimensions(data, imaging.sniff(data)) == Image.open(io.BytesIO(data)).size, name
        seen += 1
    for name, data in imagefiles.variety().items():  # EXIF-rotated, MPO, 16-bit, animated...
        fmt = imaging.sniff(data)
        if fmt:
            assert headers.dimensions(data, fmt) == Image.open(io.BytesIO(data)).size, name
            seen += 1
    assert seen > 100


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


IHDR = chunk(b"IHDR", struct.pack(">IIBBBBB", 640, 480, 8, 2, 0, 0, 0))
# Each took Pillow's Image.open seconds (measured: 12.7 s, 10.4 s, 3.2 s, 2.1 s at these sizes).
SLOW_HEADERS = {
    "jpeg then 0xff for ever": (b"\xff\xd8\xff" + b"\xff" * 20_000_000, "JPEG", "bytes that are not segments"),
    "jpeg of empty segments": (b"\xff\xd8" + b"\xff\xe1\x00\x02" * 5_000_000, "JPEG", "more than 1024 segments"),
    "jpeg then zeros": (b"\xff\xd8\xff" + bytes(20_000_000), "JPEG", "bytes that are not segments"),
    "png of text chunks": (b"\x89PNG\r\n\x1a\n" + IHDR + chunk(b"tEXt", b"k\x00v") * 1_000_000, "PNG",
                           "more than 1024 chunks"),
    "gif of comments": (b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0) + b"\x21\xfe\x01a\x00" * 3_000_000,
                        "GIF", "more than 16384 blocks"),
    # each colour profile is inflated while Pillow opens the file: 1,000 of 1 MB of zeros took 2.3 s
    "png of colour profiles": (b"\x89PNG\r\n\x1a\n" + IHDR + chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(1 << 20)))
                               * 1_000, "PNG", "more than 1 iCCP chunks"),
}


@pytest.mark.parametrize("case", sorted(SLOW_HEADERS))
def test_headers_pillow_would_walk_for_seconds_are_refused_at_once(case):
    data, fmt, message = SLOW_HEADERS[case]
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgument, match=message):
        headers.dimensions(data, fmt)
    assert time.perf_counter() - t0 < 0.05  # a bound on the work, with a wide margin: measured < 2 ms


@pytest.mark.parametrize("cut", [4, 12, 30, 100])
def test_cut_headers_say_they_are_unreadable(cut):
    for name, data in list(pictures(seed=1, per_mode=1)):
        fmt = imaging.sniff(data)
        try:
            size = headers.dimensions(data[:cut], fmt)
        except InvalidArgument as e:
            assert "header is not readable" in e.message, name
        else:  # short headers that already hold the size (BMP, GIF, WebP) may still read it
            assert size == Image.open(io.BytesIO(data)).size, name


def gif(screen: tuple[int, int], frame: tuple[int, int, int, int]) -> bytes:
    """A GIF whose first frame (left, top, width, height) may lie outside its logical screen."""
    left, top, w, h = frame
    return (b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes(6)  # 2-colour global table
            + b"\x2c" + struct.pack("<HHHHB", left, top, w, h, 0) + b"\x02\x02\x44\x01\x00\x3b")


@pytest.mark.parametrize("screen,frame", [((64, 64), (0, 0, 12000, 12000)), ((0, 0), (0, 0, 30, 20)),
                                          ((10, 10), (5, 5, 30, 20)), ((100, 80), (10, 10, 20, 20))])
def test_a_gif_is_as_large_as_its_first_frame_makes_it(screen, frame):
    """Pillow grows the picture to hold the first frame: a 64x64 screen with a 12000x12000 frame
    decodes 144 M pixels (1.2 GB), so the header must say so."""
    data = gif(screen, frame)
    assert headers.dimensions(data, "GIF") == Image.open(io.BytesIO(data)).size


def test_cut_webp_headers_are_unreadable_not_small():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="WEBP", lossless=False)
    data = buf.getvalue()
    for cut in (16, 20, 26, 29):
        with pytest.raises(InvalidArgument, match="header is not readable"):
            headers.dimensions(data[:cut], "WEBP")


def test_progressive_jpegs_are_told_apart():
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48)).save(buf, format="JPEG", progressive=progressive)
        assert headers.read(buf.getvalue(), "JPEG") == (64, 48, progressive)
