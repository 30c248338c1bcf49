"""Evaluation datasets: a folder with `manifest.jsonl`, one line per image.

    {"file": "images/beauty/0003-tilted.jpg", "category": "beauty",
     "attributes": {"brand": "Aurelle", "colour": "pink", "spec": "50 ml", ...},
     "ocr_text": "Aurelle Hydrating Lotion 50 ml", "variant": "tilted", "product_id": "beauty-0003", ...}

category is one of the study's six, variant one of its four (normal, occluded, tilted, blurred).
`synth` renders such a set with Pillow: product-like pictures carrying brand names and label text in
Latin, Chinese and Japanese script, each product in all four variants, with its ground truth.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from shelfsight import synth
from shelfsight.errors import InvalidArgument, NotFound
from shelfsight.model import imaging

MANIFEST = "manifest.jsonl"
REQUIRED = ("file", "category", "attributes", "ocr_text", "variant")


@dataclass(frozen=True)
class Item:
    file: str
    category: str
    attributes: dict
    ocr_text: str
    variant: str
    extra: dict = field(default_factory=dict)

    def truth(self) -> dict:
        return {"category": self.category, "attributes": self.attributes, "ocr_text": self.ocr_text}


def load(folder: str | Path) -> list[Item]:
    """Read and validate a dataset; errors name the line and the problem."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise NotFound(f"{folder} is not a dataset: it has no {MANIFEST}")
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InvalidArgument(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"{where}: expected a JSON object")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise InvalidArgument(f"{where}: missing {', '.join(missing)}")
        if row["category"] not in synth.CATEGORIES:
            raise InvalidArgument(f"{where}: category {row['category']!r} is not one of {', '.join(synth.CATEGORIES)}")
        if row["variant"] not in synth.VARIANTS:
            raise InvalidArgument(f"{where}: variant {row['variant']!r} is not one of {', '.join(synth.VARIANTS)}")
        if not isinstance(row["attributes"], dict) or not isinstance(row["ocr_text"], str):
            raise InvalidArgument(f"{where}: attributes must be an object and ocr_text a string")
        if row["file"] in seen:
            raise InvalidArgument(f"{where}: {row['file']} is listed twice")
        image = folder / row["file"]
        if not image.is_file():
            raise InvalidArgument(f"{where}: {row['file']} does not exist")
        with open(image, "rb") as f:
            if imaging.sniff(f.read(16)) is None:
                raise InvalidArgument(f"{where}: {row['file']} is not a supported image")
        seen.add(row["file"])
        items.append(Item(row["file"], row["category"], row["attributes"], row["ocr_text"], row["variant"],
                          {k: v for k, v in row.items() if k not in REQUIRED}))
    if not items:
        raise InvalidArgument(f"{path} lists no images")
    return items


def synthesize(out: Path, per_category: int = 4, seed: int = 0, size: tuple[int, int] = (640, 640),
               scripts: tuple[str, ...] = ("latin", "latin", "zh", "ja")) -> int:
    """Render a dataset into the (empty) folder `out`; returns the number of images.
    The same seed writes the same bytes."""
    if per_category < 1:
        raise InvalidArgument("--per-category must be at least 1")
    if any(s != "latin" for s in scripts) and not synth.cjk_available():
        raise InvalidArgument("Chinese and Japanese labels need a CJK font: install fonts-droid-fallback "
                              "(`make env` does)")
    rng = random.Random(seed)
    rows = []
    for category in synth.CATEGORIES:
        for i in range(per_category):
            product = synth.make_product(rng, category=category, script=rng.choice(scripts))
            pid = f"{category}-{i:04d}"
            for variant in synth.VARIANTS:
                rel = f"images/{category}/{i:04d}-{variant}.jpg"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                img = synth.render(product, size=size, seed=seed * 1_000_003 + len(rows), variant=variant)
                img.save(out / rel, format="JPEG", quality=90)
                rows.append({"file": rel, "category": category,
                             "attributes": {"brand": product.brand, "colour": product.colour, "spec": product.spec,
                                            "kind": product.kind},
                             "ocr_text": product.ocr_text, "variant": variant, "product_id": pid,
                             "script": product.script, "label": product.label})
    with open(out / MANIFEST, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
