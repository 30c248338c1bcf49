"""Request images for each load scenario, generated in the project (no downloads).

    cold            every request a picture never seen before (cache misses by construction)
    hot             a small set of pictures asked again and again (exact hits)
    near_duplicate  variants of a small set: re-encoded at another JPEG quality, resized, cropped by at
                    most 1% a side (perceptual hits, not exact ones)
    mixed           a medium set, several questions, unary and streaming
"""
from __future__ import annotations

import io
import itertools
import random

from PIL import Image

from shelfsight import synth

SIZE = (448, 448)


def _render(seed: int) -> Image.Image:
    rng = random.Random(seed)
    return synth.render(synth.make_product(rng), size=SIZE, seed=seed, variant=rng.choice(synth.VARIANTS))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Cold:
    """Unique pictures: a process-wide counter offset by a random base, so users never collide."""

    def __init__(self, seed: int | None = None):
        self._next = itertools.count(random.Random(seed).randrange(1 << 40))

    def __call__(self) -> bytes:
        return _jpeg(_render(next(self._next)))


class Set:
    """A fixed set of pictures, drawn at random."""

    def __init__(self, size: int, base_seed: int, seed: int | None = None):
        self.pictures = [_jpeg(_render(base_seed + i)) for i in range(size)]
        self.rng = random.Random(seed)

    def __call__(self) -> bytes:
        return self.rng.choice(self.pictures)


class NearDuplicates:
    """Variants of a few originals; the first request for each original sends it as is."""

    def __init__(self, size: int = 4, base_seed: int = 5_000, seed: int | None = None):
        self.originals = [_render(base_seed + i) for i in range(size)]
        self.rng = random.Random(seed)
        self.sent = set()

    def __call__(self) -> bytes:
        i = self.rng.randrange(len(self.originals))
        img = self.originals[i]
        if i not in self.sent:
            self.sent.add(i)
            return _jpeg(img)
        w, h = img.size
        c = [self.rng.randint(0, max(1, int(s * 0.01))) for s in (w, h, w, h)]
        img = img.crop((c[0], c[1], w - c[2], h - c[3]))
        scale = self.rng.uniform(0.85, 1.0)
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
        return _jpeg(img, quality=self.rng.randint(75, 95))
