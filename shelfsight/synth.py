"""Product-like photos rendered with Pillow, with their ground truth. No downloads.

One generator feeds every part that needs images: quantization calibration, the demo's sample photo,
the load-test scenarios and the evaluation set. The six categories and four variants are the reference
study's (shared/notes/anchors.md). Deterministic: the same seed and index give the same pixels.
"""
from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CATEGORIES = ("digital", "home", "apparel", "beauty", "food_drink", "books_stationery")
VARIANTS = ("normal", "occluded", "tilted", "blurred")
KINDS = {
    "digital": ("phone", "box"), "home": ("box", "jar"), "apparel": ("garment",),
    "beauty": ("bottle", "tube"), "food_drink": ("can", "bottle", "box"),
    "books_stationery": ("book", "notebook"),
}
COLOURS = {"red": (200, 40, 40), "blue": (40, 80, 190), "green": (40, 150, 70), "yellow": (235, 200, 40),
           "black": (30, 30, 30), "white": (245, 245, 240), "orange": (235, 130, 30),
           "purple": (120, 60, 160), "pink": (230, 130, 170), "brown": (120, 80, 45)}
BRANDS = {
    "latin": ("Lumora", "Kestrel", "Nordwick", "Aurelle", "Brightfield", "Velora", "Quillon", "Tandem",
              "Orchid Lane", "Saltmarsh", "Pinewood", "Zentra"),
    "zh": ("青禾", "云朵", "山泉", "星河", "竹韵"),
    "ja": ("ミドリ堂", "さくら", "ひかり", "やまと"),
}
SPECS = {
    "digital": ("128GB", "256GB", "6.1 inch", "5000mAh"), "home": ("2L", "30 x 20 cm", "set of 4"),
    "apparel": ("size M", "size L", "100% cotton"), "beauty": ("50 ml", "100 ml", "SPF 30"),
    "food_drink": ("330 ml", "500 ml", "1.5L", "250 g"), "books_stationery": ("A5", "200 pages", "B5"),
}
LABELS = {
    "latin": {"digital": "Smart Phone", "home": "Storage Box", "apparel": "Classic Tee",
              "beauty": "Hydrating Lotion", "food_drink": "Sparkling Water", "books_stationery": "Notebook"},
    "zh": {"digital": "智能手机", "home": "收纳盒", "apparel": "纯棉T恤", "beauty": "保湿乳液",
           "food_drink": "气泡水", "books_stationery": "笔记本"},
    "ja": {"digital": "スマートフォン", "home": "収納ボックス", "apparel": "綿Tシャツ", "beauty": "保湿ローション",
           "food_drink": "炭酸水", "books_stationery": "ノート"},
}
# Fonts with CJK glyphs, from Debian packages (fonts-droid-fallback is the smallest).
CJK_FONTS = ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
             "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")


@dataclass(frozen=True)
class Product:
    category: str
    kind: str
    brand: str
    colour: str
    spec: str
    script: str  # latin | zh | ja: the writing on the package
    label: str
    attributes: dict = field(default_factory=dict)

    @property
    def ocr_text(self) -> str:
        """Everything printed on the product, in reading order."""
        return f"{self.brand} {self.label} {self.spec}"

    def to_dict(self) -> dict:
        return asdict(self) | {"ocr_text": self.ocr_text}


class FontUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=64)
def font(size: int, script: str = "latin") -> ImageFont.FreeTypeFont:
    if script == "latin":
        return ImageFont.load_default(size)
    for path in CJK_FONTS:
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    raise FontUnavailable("no CJK font found; install Debian's fonts-droid-fallback "
                          f"(looked in {', '.join(CJK_FONTS)})")


def cjk_available() -> bool:
    return any(Path(p).exists() for p in CJK_FONTS)


def make_product(rng: random.Random, category: str | None = None, script: str | None = None,
                 scripts: tuple[str, ...] = ("latin",)) -> Product:
    """A random product; its writing is `script`, else drawn from `scripts` (CJK needs a CJK font)."""
    category = category or rng.choice(CATEGORIES)
    script = script or rng.choice(scripts)
    colour = rng.choice(sorted(COLOURS))
    return Product(category=category, kind=rng.choice(KINDS[category]),
                   brand=rng.choice(BRANDS[script]), colour=colour, spec=rng.choice(SPECS[category]),
                   script=script, label=LABELS[script][category])


def _body_box(kind: str, w: int, h: int) -> tuple[int, int, int, int]:
    cx = w // 2
    widths = {"phone": 0.32, "box": 0.5, "jar": 0.4, "garment": 0.6, "bottle": 0.26, "tube": 0.2,
              "can": 0.3, "book": 0.46, "notebook": 0.44}
    bw = int(w * widths[kind])
    top, bottom = int(h * 0.14), int(h * 0.88)
    return cx - bw // 2, top, cx + bw // 2, bottom


def _draw_body(d: ImageDraw.ImageDraw, kind: str, box, fill, w: int, h: int) -> None:
    x0, y0, x1, y1 = box
    outline = tuple(max(0, c - 60) for c in fill)
    if kind in ("bottle", "tube"):
        neck = (x1 - x0) // 3
        cx = (x0 + x1) // 2
        d.rectangle((cx - neck // 2, y0 - int(h * 0.08), cx + neck // 2, y0 + 4), fill=(90, 90, 90))
        d.rounded_rectangle(box, radius=(x1 - x0) // 3, fill=fill, outline=outline, width=3)
    elif kind in ("can", "jar"):
        d.rounded_rectangle(box, radius=(x1 - x0) // 6, fill=fill, outline=outline, width=3)
        d.ellipse((x0, y0 - 12, x1, y0 + 12), fill=(200, 200, 200), outline=outline)
    elif kind == "phone":
        d.rounded_rectangle(box, radius=22, fill=(25, 25, 25))
        d.rounded_rectangle((x0 + 8, y0 + 26, x1 - 8, y1 - 26), radius=8, fill=fill)
    elif kind == "garment":
        sleeve = (x1 - x0) // 4
        d.polygon([(x0, y0 + 30), (x0 - sleeve, y0 + 90), (x0, y0 + 120)], fill=fill, outline=outline)
        d.polygon([(x1, y0 + 30), (x1 + sleeve, y0 + 90), (x1, y0 + 120)], fill=fill, outline=outline)
        d.rectangle((x0, y0 + 20, x1, y1), fill=fill, outline=outline, width=3)
    else:  # box, book, notebook
        d.rectangle(box, fill=fill, outline=outline, width=3)
        if kind in ("book", "notebook"):
            d.rectangle((x0, y0, x0 + 14, y1), fill=outline)


def _text_centered(d, xy_box, text: str, size: int, script: str, fill) -> None:
    x0, y0, x1, _ = xy_box
    f = font(size, script)
    while size > 8 and d.textlength(text, font=f) > (x1 - x0) * 0.92:
        size -= 2
        f = font(size, script)
    tw = d.textlength(text, font=f)
    d.text(((x0 + x1 - tw) / 2, y0), text, font=f, fill=fill)


def render(product: Product, size: tuple[int, int] = (448, 448), seed: int = 0,
           variant: str = "normal") -> Image.Image:
    """An RGB photo-like render of `product`, with one of the study's variants applied."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    rng = random.Random(seed)
    w, h = size
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    d.rectangle((0, int(h * 0.9), w, h), fill=tuple(c - 40 for c in bg))  # a shelf edge
    fill = COLOURS[product.colour]
    box = _body_box(product.kind, w, h)
    _draw_body(d, product.kind, box, fill, w, h)
    x0, y0, x1, y1 = box
    label_top = y0 + (y1 - y0) // 3
    d.rectangle((x0 + 6, label_top, x1 - 6, label_top + (y1 - y0) // 3), fill=(250, 250, 245))
    ink = (20, 20, 20)
    unit = max(10, (y1 - y0) // 12)
    _text_centered(d, (x0 + 6, label_top + 4, x1 - 6, 0), product.brand, int(unit * 1.3), product.script, ink)
    _text_centered(d, (x0 + 6, label_top + int(unit * 1.8), x1 - 6, 0), product.label, unit, product.script, ink)
    _text_centered(d, (x0 + 6, label_top + int(unit * 3.1), x1 - 6, 0), product.spec, int(unit * 0.9),
                   "latin", ink)
    # mild sensor noise so that no two renders are pixel-identical by accident; drawn from the
    # render's own seed (Pillow's effect_noise uses C rand() and would break determinism)
    noise = np.random.default_rng(seed).normal(128, 6, (h, w, 1)).clip(0, 255).astype(np.uint8)
    img = Image.blend(img, Image.fromarray(np.repeat(noise, 3, axis=2), "RGB"), 0.04)
    return apply_variant(img, variant, rng)


def apply_variant(img: Image.Image, variant: str, rng: random.Random) -> Image.Image:
    w, h = img.size
    if variant == "occluded":  # something in front of part of the product
        d = ImageDraw.Draw(img)
        ox = rng.randint(0, w // 2)
        oy = rng.randint(h // 3, h // 2)
        d.ellipse((ox, oy, ox + w // 3, oy + h // 3), fill=(170, 130, 105))
    elif variant == "tilted":
        img = img.rotate(rng.uniform(8, 20) * rng.choice((-1, 1)), resample=Image.BICUBIC,
                         fillcolor=(225, 225, 225))
    elif variant == "blurred":  # locally blurred, as in the study
        x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
        region = (x0, y0, x0 + w // 2, y0 + h // 2)
        img.paste(img.crop(region).filter(ImageFilter.GaussianBlur(4)), region[:2])
    return img


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def answer_for(product: Product) -> str:
    """A plausible assistant answer (calibration text for the decoder)."""
    return (f"This is a {product.colour} {product.kind} from {product.brand} "
            f"({product.category.replace('_', ' and ')}). Label: {product.label}. Spec: {product.spec}.")


QUESTIONS = ("What brand is this product?", "List every product you can see.",
             "Read the text on the label.", "What colour is the product?",
             "Describe this product: category, brand, colour and size.")


def samples(n: int, seed: int, size: tuple[int, int] = (448, 448), scripts=("latin",)):
    """n (image, question, answer, product) tuples, deterministic for `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        product = make_product(rng, script=rng.choice(scripts))
        img = render(product, size=size, seed=seed * 100_003 + i, variant=rng.choice(VARIANTS))
        out.append((img, rng.choice(QUESTIONS), answer_for(product), product))
    return out
