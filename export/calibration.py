"""Calibration and held-out samples for quantization: product photos + questions.

From a folder: every image file in it (sorted by name), with questions from an optional
`questions.jsonl` ({"image": file name, "question": ..., "answer": ...} per line) or `questions.txt`
(one question per line, used in turn); images without a question get a generic recognition question.
Without a folder: product renders from shelfsight.synth.

A fifth of the folder (at least 2 images) is held out for fidelity and never used to calibrate;
synthetic sets draw the held-out renders from another seed.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from shelfsight import synth
from shelfsight.errors import InvalidArgument, NotFound

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Calibration cost grows with visual tokens; ~640x640 keeps CPU runs short and is plenty for GPTQ's
# Hessian statistics (each image still contributes hundreds of tokens).
MAX_PIXELS = 640 * 640
DEFAULT_QUESTION = "Describe this product: category, brand, colour and size."
SYNTH_SEED, HELDOUT_SEED = 1234, 4321


@dataclass
class Sample:
    image: Image.Image  # RGB
    question: str
    answer: str
    source: bytes  # the bytes the fingerprint is made of (file bytes, or the render as PNG)


def _fit(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w * h <= MAX_PIXELS:
        return img
    scale = (MAX_PIXELS / (w * h)) ** 0.5
    return img.resize((max(32, int(w * scale)), max(32, int(h * scale))), Image.BICUBIC)


def _questions(folder: Path) -> tuple[dict[str, dict], list[str]]:
    per_image: dict[str, dict] = {}
    in_turn: list[str] = []
    jl = folder / "questions.jsonl"
    if jl.exists():
        for n, line in enumerate(jl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                per_image[row["image"]] = row
            except (ValueError, KeyError, TypeError):
                raise InvalidArgument(f"{jl}:{n}: expected a JSON object with 'image' and 'question'") from None
    txt = folder / "questions.txt"
    if txt.exists():
        in_turn = [q.strip() for q in txt.read_text().splitlines() if q.strip()]
    return per_image, in_turn


def from_folder(folder: str | Path, limit: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """(calibration, held-out) samples from a folder of product photos."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 3:
        raise InvalidArgument(f"calibration folder {folder} needs at least 3 images "
                              f"({IMAGE_SUFFIXES}), found {len(files)}")
    per_image, in_turn = _questions(folder)
    samples = []
    for i, f in enumerate(files):
        data = f.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = _fit(im.convert("RGB"))
        except Exception as e:
            raise InvalidArgument(f"calibration image {f} is unreadable: {type(e).__name__}: {e}") from None
        row = per_image.get(f.name, {})
        question = row.get("question") or (in_turn[i % len(in_turn)] if in_turn else DEFAULT_QUESTION)
        samples.append(Sample(img, question, row.get("answer", ""), data + question.encode()))
    n_held = max(2, len(samples) // 5)
    calib, held = samples[:-n_held], samples[-n_held:]
    return (calib[:limit] if limit else calib), held


def synthetic(n: int, seed: int) -> list[Sample]:
    out = []
    for img, question, answer, _ in synth.samples(n, seed=seed):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(Sample(img, question, answer, buf.getvalue() + question.encode()))
    return out


def load(folder: str | Path | None, samples: int, heldout: int = 8) -> tuple[list[Sample], list[Sample], str]:
    """(calibration, held-out, kind) where kind names where they came from."""
    if folder:
        calib, held = from_folder(folder, samples)
        return calib, held, f"folder:{Path(folder).name}"
    return synthetic(samples, SYNTH_SEED), synthetic(heldout, HELDOUT_SEED), "synthetic"


def fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(hashlib.sha256(s.source).digest())
    return h.hexdigest()
