"""Does a perceptual cache hit mean "the model would see the same thing"? Measured on pictures made here.

    python bench/perceptual_pairs.py [--quick] [--show N]

Two sets, both run through the real ResultCache (MemoryStore), each picture stored first and its
partner looked up after, as the gateway does:

- text pairs: the same label layout whose text differs only in a price, SKU, date, size or a misspelt
  brand, in Latin, Chinese and Japanese, several fonts and sizes. Any perceptual hit is a false hit:
  the model would read another label. A third of them are also asked with B resized to 90% and
  re-encoded.
- same-picture variants: label pictures and photo-like product renders (shelfsight.synth: texture,
  noise) as JPEG q70-95, resized to 80-100%, cropped by up to 1% on any sides, and combinations.
  A perceptual hit is a true hit.

- the families of bench/_families.py: colour regions of 1.6-40% changed at the same grey
  level, faint small print, one product of a shelf recoloured (false hits), and their pictures' copies.

Prints the rates with counts for three rules in the same run: hash only (pHash + colour layout), the
grey check (hash finds a candidate, the grey plane decides: the rule before colour and faint print were
compared), and the whole check (now); the time of a lookup and of the check alone (both run on the gateway's
thread pool), and the stored thumbnails' size.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shelfsight import synth  # noqa: E402
from shelfsight.conversation import Conversation  # noqa: E402
from bench import _families as pf  # noqa: E402
from shelfsight.gateway import cache, likeness  # noqa: E402
from shelfsight.gateway.settings import CacheSettings  # noqa: E402
from shelfsight.model.imaging import PixelBounds  # noqa: E402

DEJAVU = "/usr/share/fonts/truetype/dejavu/"
LATIN_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
               "DejaVuSansCondensed-Bold.ttf")
CJK_FONT = "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"
# (kind, script, heading, text A, text B): B differs from A only where a reader would read another value.
TEXTS = [
    ("price", "latin", "TEA", "$4.99", "$9.99"), ("price", "latin", "COFFEE", "€12.50", "€12.80"),
    ("price", "latin", "SALE", "$19.00", "$18.00"), ("price", "latin", "SNACK", "£3.49", "£3.99"),
    ("sku", "latin", "ITEM", "SKU 12345", "SKU 12346"), ("sku", "latin", "PART", "SKU 88120", "SKU 83120"),
    ("date", "latin", "MILK", "EXP 2025", "EXP 2026"), ("date", "latin", "BREAD", "BEST BY 03/26", "BEST BY 08/26"),
    ("size", "latin", "RICE", "250 g", "500 g"), ("size", "latin", "JUICE", "330 ml", "380 ml"),
    ("size", "latin", "SHOES", "Size 8", "Size 9"), ("size", "latin", "PACK", "x1", "x2"),
    ("size", "latin", "SHIRT", "Size M", "Size L"),
    ("brand", "latin", "AUDIO", "Sony", "Sany"), ("brand", "latin", "SPORT", "NIKE", "MIKE"),
    ("brand", "latin", "COLOUR", "RED", "BED"), ("brand", "latin", "LABEL", "BRAND A", "BRAND B"),
    ("brand", "latin", "SPORT", "adidas", "abidas"), ("brand", "latin", "CAMERA", "Canon", "Cannon"),
    ("brand", "latin", "SOAP", "Dove", "Dave"),
    ("price", "zh", "价格", "¥12.80", "¥18.80"), ("size", "zh", "大米", "净含量 250克", "净含量 500克"),
    ("date", "zh", "牛奶", "生产日期 2025年", "生产日期 2026年"), ("brand", "zh", "奶糖", "大白兔", "太白兔"),
    ("brand", "zh", "方便面", "康师傅", "康帅傅"), ("brand", "zh", "饮料", "雪碧", "雪璧"),
    ("sku", "zh", "货号", "编号 30417", "编号 30411"), ("size", "zh", "衬衫", "尺码 大", "尺码 中"),
    ("price", "ja", "お茶", "¥480", "¥430"), ("size", "ja", "シャツ", "サイズ M", "サイズ L"),
    ("brand", "ja", "薬局", "ドラッグ", "トラッグ"), ("brand", "ja", "洗髪", "シャンプー", "ツャンプー"),
    ("date", "ja", "牛乳", "賞味期限 2025年", "賞味期限 2026年"), ("size", "ja", "飲料", "内容量 500ml", "内容量 300ml"),
]
SIZES = (24, 32, 40, 56)  # text height in px on the canvas below
CANVASES = ((640, 640), (800, 600), (480, 640))
BOXES = ((40, 150, 70), (200, 40, 40), (240, 240, 235), (235, 200, 40), (40, 80, 190))


@dataclass(frozen=True)
class Label:
    heading: str
    text: str
    script: str
    font: str
    size: int
    canvas: tuple[int, int]
    box: tuple[int, int, int]
    offset: int  # vertical position of the text line


def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(name if name.startswith("/") else DEJAVU + name, size)


def render(label: Label) -> Image.Image:
    """A box on a plain background, a heading on top, the text in the middle: the issue's TEA picture."""
    w, h = label.canvas
    img = Image.new("RGB", (w, h), (250, 250, 248))
    d = ImageDraw.Draw(img)
    d.rectangle((w // 8, h // 8, w - w // 8, h - h // 8), fill=label.box, outline=(30, 30, 30), width=3)
    ink = (255, 255, 255) if sum(label.box) < 500 else (20, 20, 20)
    write(d, (w // 2, h // 4), label.heading, label.font, 48, ink)
    write(d, (w // 2, h // 2 + label.offset), label.text, label.font, label.size, ink)
    return img


def write(d: ImageDraw.ImageDraw, centre: tuple[int, int], text: str, latin: str, size: int, ink) -> None:
    """Text centred on `centre`: CJK characters in the CJK font, the rest (digits, Latin, ¥) in `latin`
    (the CJK font has no Latin glyphs: it would draw 5 and 6 as the same empty box)."""
    runs = [(CJK_FONT if cjk else latin, "".join(chars))
            for cjk, chars in itertools.groupby(text, key=lambda ch: ord(ch) >= 0x2E80)]
    widths = [d.textlength(t, font=font(f, size)) for f, t in runs]
    x = centre[0] - sum(widths) / 2
    for (f, t), width in zip(runs, widths):
        d.text((x, centre[1] + size // 3), t, font=font(f, size), fill=ink, anchor="ls")
        x += width


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def issue_pair() -> tuple[bytes, bytes]:
    """The issue's reproduction: 640x640, green box, "TEA" on top, $4.99 vs $9.99 in DejaVuSans-Bold 40."""
    base = Label("TEA", "$4.99", "latin", "DejaVuSans-Bold.ttf", 40, (640, 640), (40, 150, 70), 0)
    return jpeg(render(base)), jpeg(render(replace(base, text="$9.99")))


def text_pairs(quick: bool = False, seed: int = 0) -> list[tuple[str, Label, Label]]:
    """(name, A, B) for every text change, font and size (quick: one font and size per change)."""
    rng = random.Random(seed)
    out = []
    for kind, script, heading, a, b in TEXTS:
        for name, size in itertools.product(LATIN_FONTS, SIZES):  # CJK text: CJK font + this one
            if quick and rng.random() > 0.25:
                continue
            base = Label(heading, a, script, name, size, rng.choice(CANVASES), rng.choice(BOXES),
                         rng.randrange(-40, 60))
            out.append((f"{kind}/{script} {a!r}->{b!r} {Path(name).stem} {size}px", base, replace(base, text=b)))
    return out


def variant(img: Image.Image, quality=90, scale=1.0, crop=(0.0, 0.0, 0.0, 0.0)) -> bytes:
    """img cropped by fractions (left, top, right, bottom), resized by `scale`, JPEG at `quality`."""
    w, h = img.size
    l, t, r, b = crop
    img = img.crop((round(w * l), round(h * t), w - round(w * r), h - round(h * b)))
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    return jpeg(img, quality)


VARIANTS = {
    "jpeg q70": dict(quality=70), "jpeg q80": dict(quality=80), "jpeg q95": dict(quality=95),
    "resize 80%": dict(scale=0.8), "resize 90%": dict(scale=0.9), "resize 97%": dict(scale=0.97),
    "crop 1% left": dict(crop=(0.01, 0, 0, 0)), "crop 1% top+bottom": dict(crop=(0, 0.005, 0, 0.005)),
    "crop 1% all sides": dict(crop=(0.005, 0.005, 0.005, 0.005)), "crop 0.5% right": dict(crop=(0, 0, 0.005, 0)),
    "resize 85% + q75": dict(scale=0.85, quality=75),
    "crop 1% + resize 90% + q80": dict(crop=(0.01, 0.01, 0, 0), scale=0.9, quality=80),
}


async def perceptual_hit(settings: CacheSettings, stored: bytes, asked: bytes, timings: list) -> bool:
    """Store an answer for `stored`, then ask with `asked`: did the perceptual level answer?"""
    rc = cache.ResultCache(settings, cache.MemoryStore(settings.max_bytes))
    key = lambda image: cache.make_key((image,), Conversation.ask("Read the label."), {"temperature": 0.0}, "bench", False)  # noqa: E731
    first = cache.Probe(key(stored))
    assert await rc.lookup(first, stored, lambda *_: None) is None
    await rc.put(first, stored, cache.CachedAnswer("label", "bench", 1, 1, "stop", time.time()))
    t0 = time.perf_counter()
    found = await rc.lookup(cache.Probe(key(asked)), asked, lambda *_: None)
    timings.append(time.perf_counter() - t0)
    return found is not None and found[1] == "perceptual"


def run_set(settings, items, timings, checks, failed) -> tuple[list[str], list[tuple[float, str]]]:
    """Ask each (name, stored, asked); -> names where failed(hit), and (smallest check score, name)."""
    failures, scores = [], []
    for name, stored, asked in items:
        before = len(checks)
        if failed(asyncio.run(perceptual_hit(settings, stored, asked, timings))):
            failures.append(name)
        if len(checks) > before:
            scores.append((min(v for _, v in checks[before:]), name))
    return failures, scores


def ms(seconds: list[float]) -> str:
    q = statistics.quantiles(seconds, n=20)
    return f"{1000 * statistics.median(seconds):.1f} ms median, {1000 * q[-1]:.1f} ms p95"


def rate(hits: int, n: int) -> str:
    return f"{hits}/{n} = {100 * hits / max(1, n):.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the text pairs, fewer of each family")
    ap.add_argument("--show", type=int, default=5, help="list up to N failures of each kind")
    args = ap.parse_args()
    new = CacheSettings()
    rules = {"hash only": replace(new, verify=False, max_distance=10),
             "grey check (before)": new, "grey + colour + faint-print check (now)": new}
    colour = {"grey check (before)": False}  # the check's colour and faint-print planes on or off
    pairs = text_pairs(quick=args.quick)
    changed = {"text": [(name, jpeg(render(a)), jpeg(render(b))) for name, a, b in pairs]}
    # and a third of them asked with B also resized and re-encoded: the check then blurs to B's resolution
    changed["text"] += [(f"{name} (B at 90%, q80)", jpeg(render(a)), variant(render(b), quality=80, scale=0.9))
                        for name, a, b in pairs[1::3]]
    families = {name: make(quick=args.quick) for name, make in pf.FAMILIES.items()}
    changed |= {name: [(n, jpeg(a), jpeg(b)) for n, a, b in items] for name, items in families.items()}
    originals = {}
    for _, a, _ in pairs:  # one picture per distinct layout for the variants
        originals.setdefault((a.text, a.font, a.canvas), render(a))
    pictures = list(originals.values())[:: 2 if not args.quick else 6]
    rng = random.Random(1)
    pictures += [synth.render(synth.make_product(rng, scripts=("latin", "zh", "ja")), size=size, seed=i)
                 for i, size in enumerate([(640, 640), (800, 600), (480, 400), (1024, 768)] * (10 if not args.quick else 3))]
    copies = {"labels and renders": [(f"{v} #{i}", jpeg(img), variant(img, **kw))
                                     for i, img in enumerate(pictures) for v, kw in VARIANTS.items()]}
    family_pictures = [a for items in families.values() for _, a, _ in items[:: 3 if not args.quick else 6]]
    copies["the families' pictures"] = [(f"{v} #{i}", jpeg(img), variant(img, **kw))
                                        for i, img in enumerate(family_pictures) for v, kw in VARIANTS.items()]
    print(", ".join(f"{len(v)} {k} pairs" for k, v in changed.items()) + "; "
          + ", ".join(f"{len(v)} copies of {k}" for k, v in copies.items()))
    checks: list[tuple[float, float]] = []  # (seconds, difference) of each check ResultCache makes
    check = cache.difference
    use_colour = [True]

    def timed_check(*a):
        t0 = time.perf_counter()
        value = check(*a, grey_only=not use_colour[0])
        checks.append((time.perf_counter() - t0, value))
        return value
    cache.difference = timed_check  # ResultCache calls it through the module
    first = likeness.decode_picture(copies["labels and renders"][0][1])
    check(first, likeness.thumbnail(first, 512))  # warm-up
    for kind, items in copies.items():  # thumbnails at the side of the model's view (likeness.check_side)
        sizes = [len(likeness.thumbnail(pic, likeness.check_side(likeness.view_side(*pic.info["source"], PixelBounds.max_pixels),
                                                                  new.verify_side)).encode())
                 for pic in (likeness.decode_picture(a) for _, a, _ in items[::len(VARIANTS)])]
        print(f"stored thumbnails of {kind} (zlib): median {statistics.median(sizes) / 1024:.0f} KiB,"
              f" max {max(sizes) / 1024:.0f} KiB")
    for rule, settings in rules.items():
        use_colour[0] = colour.get(rule, True)
        timings: list[float] = []
        checks.clear()
        print(f"\n{rule}")
        closest = []
        for kind, items in changed.items():
            false, scores = run_set(settings, items, timings, checks, lambda hit: hit)
            closest += sorted(scores)[:1]
            print(f"  false hits, {kind + ' changed:':22s} {rate(len(false), len(items))}")
            for n in false[: args.show]:
                print("      false hit:", n)
        for kind, items in copies.items():
            misses, scores = run_set(settings, items, timings, checks, lambda hit: not hit)
            closest += sorted(scores)[-1:]
            print(f"  true hits, copies of {kind + ':':24s} {rate(len(items) - len(misses), len(items))}")
            for n in misses[: args.show]:
                print("      missed copy:", n)
        print(f"  lookup (exact + perceptual): {ms(timings)}")
        if checks:
            print(f"  the check alone:             {ms([t for t, _ in checks])} ({len(checks)} checks)\n"
                  f"  check score (served at <= {settings.max_difference}), the closest call of each set:")
            for value, name in closest:
                print(f"    {value:6.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
