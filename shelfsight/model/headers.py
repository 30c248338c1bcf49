"""An encoded picture's pixel size read from its header with bounded work, before Pillow sees it.

Pillow's openers walk headers in Python, a byte or a block at a time, with no bound: a body of 20 MB
that starts like a JPEG and continues with 0xFF bytes took 12.7 s in `Image.open` (5 M empty APP1
segments 10.4 s, 1 M PNG text chunks 3.2 s, 3 M GIF comment blocks 2.1 s), a stall for whichever
thread holds it. No real picture needs that many segments before its pixels, so this walk counts
them and refuses a header that goes on too long, naming why (or one that makes Pillow inflate too
much: PNG colour profiles and compressed text); it reads the size (what the decoded picture will
cost) on the way. Every step is O(1) or a C-speed `bytes.find`, at most MAX_SEGMENTS of them
(MAX_GIF_BLOCKS for GIF's small sub-blocks).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from shelfsight.errors import InvalidArgument

MAX_SEGMENTS = 1024  # JPEG markers, PNG chunks or GIF sub-blocks before the first pixels; cameras write < 40
MAX_JUNK = 64 * 1024  # bytes between JPEG segments that are no marker (broken writers leave a few)
# JPEG frame headers that carry the size: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8, DAC CC)
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
# PNG chunks Pillow inflates while it opens a file (up to 1 MB each): the spec allows one colour
# profile; a thousand of them cost 2.3 s in Image.open.
MAX_INFLATED = {b"iCCP": 1, b"zTXt": 16, b"iTXt": 16}
MAX_GIF_BLOCKS = 16_384  # sub-blocks (<= 255 bytes each) before the first image: 4 MB of XMP or comments


def _too_long(fmt: str, what: str) -> InvalidArgument:
    return InvalidArgument(f"{fmt} header has more than {MAX_SEGMENTS} {what} before its pixels; "
                           "not a picture this service reads")


def _truncated(fmt: str) -> InvalidArgument:
    return InvalidArgument(f"image starts like a {fmt} file but its header is not readable (corrupt or truncated)")


class Header(NamedTuple):
    width: int
    height: int
    progressive: bool = False  # a progressive JPEG: libjpeg holds every coefficient at full size


def read(data: bytes, fmt: str) -> Header:
    """The header of `data`, sniffed as `fmt`; InvalidArgument when it cannot be read within the
    bounds above."""
    try:
        return _READERS[fmt](data)
    except (struct.error, IndexError, ValueError):
        raise _truncated(fmt) from None


def dimensions(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height): the size Pillow will open the picture at."""
    header = read(data, fmt)
    return header.width, header.height


def _jpeg(data: bytes) -> Header:
    i, junk, size = 2, 0, None
    for _ in range(MAX_SEGMENTS):
        if data[i] != 0xFF:  # not a marker: skip to the next 0xFF, within bounds
            end = i + MAX_JUNK - junk + 1
            j = data.find(b"\xff", i, end)
            if j < 0:
                if end >= len(data):
                    raise _truncated("JPEG")
                raise InvalidArgument(f"JPEG header has more than {MAX_JUNK} bytes that are not segments")
            junk += j - i
            i = j
        window = data[i + 1:i + 2 + MAX_JUNK - junk]
        fill = len(window) - len(window.lstrip(b"\xff"))  # fill bytes before a marker
        if fill > MAX_JUNK - junk:
            raise InvalidArgument(f"JPEG header has more than {MAX_JUNK} bytes that are not segments")
        i += fill
        junk += fill
        marker = data[i + 1]
        i += 2
        if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7:  # no length: SOI, TEM, stuffing, RSTn
            continue
        if marker == 0xD9:  # end of image before any scan
            break
        (length,) = struct.unpack(">H", data[i:i + 2])
        if marker in SOF:
            height, width = struct.unpack(">HH", data[i + 3:i + 7])
            size = Header(width, height, marker in PROGRESSIVE)
        if marker == 0xDA:  # start of scan: the pixels follow
            if size is None:
                raise _truncated("JPEG")
            return size
        i += length
    else:
        raise _too_long("JPEG", "segments")
    raise _truncated("JPEG")


def _png(data: bytes) -> Header:
    i, size, inflated = 8, None, dict.fromkeys(MAX_INFLATED, 0)
    for _ in range(MAX_SEGMENTS):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"IHDR":
            size = Header(*struct.unpack(">II", data[i + 8:i + 16]))
        if kind in inflated:
            inflated[kind] += 1
            if inflated[kind] > MAX_INFLATED[kind]:
                raise InvalidArgument(f"PNG header has more than {MAX_INFLATED[kind]} {kind.decode()} chunks; "
                                      "not a picture this service reads")
        if kind in (b"IDAT", b"IEND"):
            if size is None or kind == b"IEND":
                raise _truncated("PNG")
            return size
        i += 12 + length
    raise _too_long("PNG", "chunks")


def _gif(data: bytes) -> Header:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    in_extension = False
    for _ in range(MAX_GIF_BLOCKS):  # one block introducer or one sub-block a turn
        if in_extension:
            size = data[i]
            i += 1 + size
            in_extension = size != 0  # an empty sub-block ends the extension
            continue
        block = data[i]
        if block == 0x2C:  # the first image: Pillow's picture is the screen, grown to hold this frame
            left, top, w, h = struct.unpack("<HHHH", data[i + 1:i + 9])
            return Header(max(width, left + w), max(height, top + h))
        if block != 0x21:  # the trailer or garbage before any image
            raise _truncated("GIF")
        i += 2  # introducer + label; sub-blocks follow
        in_extension = True
    raise InvalidArgument(f"GIF header has more than {MAX_GIF_BLOCKS} blocks before its pixels; "
                          "not a picture this service reads")


def _webp(data: bytes) -> Header:
    if len(data) < 30:  # every kind's size lies within the first 30 bytes
        raise _truncated("WEBP")
    kind = data[12:16]
    if kind == b"VP8X":  # extended: the canvas size, 24 bits each, minus one
        w, h = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    elif kind == b"VP8L":  # lossless: 14 bits each, minus one, after the 0x2f signature
        bits = int.from_bytes(data[21:25], "little")
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8 ":  # lossy key frame: start code, then 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            raise _truncated("WEBP")
        w, h = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    else:
        raise _truncated("WEBP")
    return Header(w, h)


def _bmp(data: bytes) -> Header:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 core header: 16-bit sizes
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    return Header(w, abs(h))  # negative height: rows stored top-down


_READERS = {"JPEG": _jpeg, "PNG": _png, "GIF": _gif, "WEBP": _webp, "BMP": _bmp}
