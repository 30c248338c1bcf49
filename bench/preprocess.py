"""Preprocessing throughput: shelfsight's preprocess step vs transformers' Qwen3-VL processor.

    python bench/preprocess.py [--model DIR] [--threads 1] [--rounds 3]

Both sides get the same encoded JPEG photos and the same question and produce the same tensors
(tests/test_preprocessing.py checks equality): decode with Pillow, resize by Qwen's rule
(max 1,048,576 pixels), normalize, cut patches, render and tokenize the prompt.
Prints images/s per picture size and overall, with the ratio shelfsight / processor, for shelfsight's
preprocess step as served (it stops at the resized uint8 pixels; `generate` cuts and normalizes the
patches on its device) and with the patches computed here too (what preprocess did before), and the
bytes each sends to `generate` per picture.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shelfsight import params, synth  # noqa: E402
from shelfsight.model import imaging  # noqa: E402
from shelfsight.model.preprocessing import load_preprocessor  # noqa: E402

SIZES = [(448, 448), (800, 600), (1024, 768), (1920, 1080), (4000, 3000)]
QUESTION = "What brand is this product?"
BOUNDS = {"shortest_edge": 65_536, "longest_edge": 1_048_576}


def photos(w, h, n=4):
    import random

    rng = random.Random(w * h)
    return [synth.encode(synth.render(synth.make_product(rng), size=(w, h), seed=i), "JPEG", 90) for i in range(n)]


def rate(fn, items, rounds):
    fn(items[0])
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="checkpoint (default: a fresh tiny one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one preprocess instance)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from shelfsight.export import tiny

        model = Path(tempfile.mkdtemp()) / "tiny"
        model.mkdir()
        tiny.build(model)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    pre = load_preprocessor(model, BOUNDS["shortest_edge"], BOUNDS["longest_edge"], imaging.ImageLimits(),
                            params.Limits())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]

    def baseline(data: bytes):
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return processor(text=[text], images=[picture], size=BOUNDS, return_tensors="pt")

    def ours(data: bytes):
        return pre(data, QUESTION)

    def ours_patches(data: bytes):
        return pre(data, QUESTION).pixel_values

    print(f"# preprocessing, torch threads {args.threads}, best of {args.rounds}")
    print("| picture | processor img/s | shelfsight img/s (pixels) | ratio | shelfsight + patches img/s | ratio "
          "| pixels KB | patches KB |")
    print("|---|---|---|---|---|---|---|---|")
    t_base = t_ours = t_patch = n = 0
    for w, h in SIZES:
        items = photos(w, h)
        b, o, op = (rate(fn, items, args.rounds) for fn in (baseline, ours, ours_patches))
        t_base += len(items) / b
        t_ours += len(items) / o
        t_patch += len(items) / op
        n += len(items)
        x = pre(items[0], QUESTION)
        print(f"| {w}x{h} JPEG | {b:.1f} | {o:.1f} | {o / b:.2f} | {op:.1f} | {op / b:.2f} | {x.pixels.nbytes / 1e3:.0f} "
              f"| {x.pixel_values.nbytes / 1e3:.0f} |", flush=True)
    print(f"| all ({n} pictures) | {n / t_base:.1f} | {n / t_ours:.1f} | {t_base / t_ours:.2f} | {n / t_patch:.1f} "
          f"| {t_base / t_patch:.2f} | | |")


if __name__ == "__main__":
    main()
