"""Pairs of pictures a perceptual cache must tell apart, in families made here (bench/perceptual_pairs.py
runs them; tests/test_perceptual.py pins some of each):

- colour: a region of 1.6-40% of the picture (a cap, a sticker, a logo, a sole) changes hue at about
  the same grey level: the same photo of another SKU. Regions of several sizes, shapes, hues and
  luminances, on product renders and on plain backgrounds.
- faint: small print (12-16 px) in low contrast - grey on grey, white on yellow, pale on white -
  whose price or volume changes.
- group: a shelf of several products, one of them recoloured.

Each family also yields its pictures' copies (re-encoded, resized, cropped), which must stay hits:
sharp colour edges are where JPEG's halved chroma resolution errs most.
"""
from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shelfsight import synth

DEJAVU = "/usr/share/fonts/truetype/dejavu/"


def luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def oklab(rgb) -> np.ndarray:
    """One sRGB colour (0..255) in OKLab (L 0..1)."""
    c = np.asarray(rgb, np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566],
                   [0.0883024619, 0.2817188376, 0.6299787005]])
    m2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468], [1.9779984951, -2.4285922050, 0.4505937099],
                   [0.0259040371, 0.7827717662, -0.8086757660]])
    return m2 @ np.cbrt(m1 @ lin)


def same_grey_other_hue(rng: random.Random, base, min_delta: float = 0.08, max_luma_diff: float = 4.0):
    """A colour of base's grey level (within max_luma_diff) whose OKLab colour (a, b) lies >= min_delta away."""
    for _ in range(1000):
        h = rng.random()
        s = rng.uniform(0.35, 1.0)
        for v in np.linspace(0.2, 1.0, 41):
            cand = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))
            if abs(luma(cand) - luma(base)) <= max_luma_diff and \
                    np.linalg.norm((oklab(cand) - oklab(base))[1:]) >= min_delta:
                return cand
    raise RuntimeError(f"no colour of the grey level of {base}")


def saturated(rng: random.Random):
    h, s, v = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 0.95)
    return tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))


@dataclass(frozen=True)
class Region:
    fraction: float  # of the picture's area
    shape: str  # rect | ellipse | stripe
    centre: tuple[float, float]  # fractions of width, height


def draw_region(img: Image.Image, region: Region, colour) -> Image.Image:
    img = img.copy()
    w, h = img.size
    area = region.fraction * w * h
    if region.shape == "stripe":  # a sole or a band: 4:1, inside the picture
        rw = min(0.9 * w, (area * 4) ** 0.5)
        rh = area / rw
    elif region.shape == "ellipse":
        rw = rh = 2 * (area / np.pi) ** 0.5
    else:
        rw = rh = area ** 0.5
    cx, cy = region.centre[0] * w, region.centre[1] * h
    box = (cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2)
    d = ImageDraw.Draw(img)
    (d.ellipse if region.shape == "ellipse" else d.rectangle)(box, fill=colour)
    return img


def backgrounds(rng: random.Random, n: int) -> list[Image.Image]:
    """Product renders and plain canvases at the sizes clients send."""
    out = []
    for i in range(n):
        size = rng.choice([(640, 640), (800, 600), (480, 640), (1024, 768)])
        if i % 3 == 2:
            out.append(Image.new("RGB", size, tuple(rng.randint(200, 250) for _ in range(3))))
        else:
            out.append(synth.render(synth.make_product(rng), size=size, seed=rng.randrange(1 << 30)))
    return out


# OKLab a-b distances of the changed colour: 0.02 is about the smallest a person tells apart side by side;
# another shade of a product's range is >= 0.05 (neighbouring reds of a lipstick range: 0.05-0.15).
DELTAS = (0.05, 0.08, 0.15)


def colour_pairs(seed: int = 0, quick: bool = False) -> list[tuple[str, Image.Image, Image.Image]]:
    rng = random.Random(seed)
    fractions = (0.016, 0.03, 0.05, 0.1, 0.2, 0.4)
    out = []
    for bg in backgrounds(rng, 4 if quick else 12):
        for fraction in fractions:
            region = Region(fraction, rng.choice(("rect", "ellipse", "stripe")),
                            (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)))
            a = saturated(rng)
            b = same_grey_other_hue(rng, a, min_delta=rng.choice(DELTAS))
            name = f"colour {fraction:.1%} {region.shape} {a}->{b} on {bg.size[0]}x{bg.size[1]}"
            out.append((name, draw_region(bg, region, a), draw_region(bg, region, b)))
    return out


FAINT = [  # (background, ink): low-contrast print as packages carry it
    ((180, 180, 180), (150, 150, 150)), ((200, 200, 200), (170, 170, 170)), ((120, 120, 120), (95, 95, 95)),
    ((235, 200, 40), (255, 255, 255)), ((250, 220, 60), (255, 255, 240)), ((245, 245, 245), (210, 210, 210)),
    ((230, 225, 215), (195, 190, 180)), ((60, 110, 180), (90, 140, 205)),
]
FAINT_TEXTS = [("250 ml", "280 ml"), ("$4.99", "$4.39"), ("500 g", "600 g"), ("1.5 L", "1.0 L"),
               ("€12.50", "€12.80"), ("SPF 30", "SPF 50"), ("No. 12", "No. 17"), ("EXP 03/26", "EXP 08/26")]


def faint_label(size: tuple[int, int], bg, ink, text: str, px: int, where: tuple[int, int], fontname: str,
                backdrop: Image.Image | None) -> Image.Image:
    """A tag of colour `bg` with `text` in `ink` at `px` px, on a render or a plain canvas."""
    img = backdrop.copy() if backdrop is not None else Image.new("RGB", size, (248, 248, 246))
    d = ImageDraw.Draw(img)
    f = ImageFont.truetype(DEJAVU + fontname, px)
    x, y = where
    tw = 0.75 * px * len(text)  # the same tag for both texts of a pair (they have equal lengths)
    d.rectangle((x - 10, y - 8, x + tw + 10, y + px + 8), fill=bg)
    d.text((x, y), text, font=f, fill=ink)
    return img


def faint_pairs(seed: int = 0, quick: bool = False) -> list[tuple[str, Image.Image, Image.Image]]:
    rng = random.Random(seed)
    out = []
    fonts = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf")
    for (bg, ink) in FAINT:
        for px in (12, 14, 16):
            if quick and rng.random() > 0.4:
                continue
            ta, tb = rng.choice(FAINT_TEXTS)
            size = rng.choice([(640, 640), (800, 600), (480, 640)])
            backdrop = synth.render(synth.make_product(rng), size=size, seed=rng.randrange(1 << 30)) \
                if rng.random() < 0.5 else None
            where = (rng.randrange(40, size[0] // 2), rng.randrange(40, size[1] - 80))
            fontname = rng.choice(fonts)
            a, b = (faint_label(size, bg, ink, t, px, where, fontname, backdrop) for t in (ta, tb))
            out.append((f"faint {px}px {ink} on {bg} {ta!r}->{tb!r}", a, b))
    return out


def shelf(items: list[synth.Product], seeds: list[int], size=(800, 600), cols: int = 4) -> Image.Image:
    w, h = size
    rows = -(-len(items) // cols)
    cw, ch = w // cols, h // rows
    img = Image.new("RGB", size, (236, 236, 232))
    for i, (p, s) in enumerate(zip(items, seeds)):
        img.paste(synth.render(p, size=(cw, ch), seed=s), ((i % cols) * cw, (i // cols) * ch))
    return img


def group_pairs(seed: int = 0, quick: bool = False) -> list[tuple[str, Image.Image, Image.Image]]:
    rng = random.Random(seed)
    out = []
    for n in (4, 6, 8, 8, 12, 12) * (1 if quick else 3):
        items = [synth.make_product(rng) for _ in range(n)]
        seeds = [rng.randrange(1 << 30) for _ in range(n)]
        k = rng.randrange(n)
        other = rng.choice([c for c in sorted(synth.COLOURS) if c != items[k].colour])
        changed = list(items)
        changed[k] = synth.Product(**_recoloured(items[k], other))
        size = rng.choice([(800, 600), (1024, 768), (640, 640)])
        cols = 4 if n > 6 else 3 if n > 4 else 2
        out.append((f"group of {n}: #{k} {items[k].colour}->{other} {size[0]}x{size[1]}",
                    shelf(items, seeds, size, cols), shelf(changed, seeds, size, cols)))
    return out


def _recoloured(p: synth.Product, colour: str) -> dict:
    return dict(category=p.category, kind=p.kind, brand=p.brand, colour=colour, spec=p.spec,
                script=p.script, label=p.label, attributes=p.attributes)


LARGE_TEXTS = [("PRICE $1.99", "PRICE $7.49"), ("500 ml", "300 ml"), ("EXP 03/26", "EXP 08/26"), ("SKU 30417", "SKU 30411")]


def large_pairs(seed: int = 0, quick: bool = False) -> list[tuple[str, Image.Image, Image.Image]]:
    """Phone-sized photos (1600-4000 px) with a price tag in black on white whose print is 7-16 px in
    the model's view (~1024 px a side): a check at a fixed 512 px lost it and served the other tag's answer."""
    rng = random.Random(seed)
    out = []
    for side in (1600, 2400, 3000, 4000):
        for model_px in (7, 10, 13, 16):
            if quick and rng.random() > 0.4:
                continue
            px = round(model_px * side / 1024)
            ta, tb = rng.choice(LARGE_TEXTS)
            backdrop = synth.render(synth.make_product(rng), seed=rng.randrange(1 << 30)).resize((side, side), Image.BICUBIC)
            where = (rng.randrange(side // 20, side // 2), rng.randrange(side // 20, side - 3 * px))
            a, b = (faint_label((side, side), (255, 255, 255), (0, 0, 0), t, px, where, "DejaVuSans.ttf", backdrop)
                    for t in (ta, tb))
            out.append((f"large {side} px, {model_px} px print as the model sees it {ta!r}->{tb!r}", a, b))
    return out


FAMILIES = {"colour": colour_pairs, "faint": faint_pairs, "group": group_pairs, "large": large_pairs}
