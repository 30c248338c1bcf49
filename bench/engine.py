"""Engine vs plain transformers generate(), same model, same run.

    python bench/engine.py                       # tiny random model on CPU (runs anywhere)
    python bench/engine.py --shape 2b --device cuda --dtype bfloat16 --new-tokens 128   # GPU host

Reports, for concurrency 1, 8 and 32 (answers forced to --new-tokens tokens, greedy, one 448x448
product photo each): time to first token, ms per output token, requests/s and tokens/s, and the ratio
engine / generate(). generate() runs each concurrency level as one left-padded batch, its best case.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shelfsight import imaging, params, synth  # noqa: E402
from shelfsight.engine import Engine, EngineConfig, Request  # noqa: E402
from shelfsight.params import GenerationParams  # noqa: E402
from shelfsight.preprocessing import Preprocessor, PixelPolicy  # noqa: E402


class Timed:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = self.last = None
        self.done = threading.Event()
        self.tokens = 0

    def is_cancelled(self):
        return False

    def send(self, delta, prompt, completion, finish):
        now = time.perf_counter()
        self.first = self.first or now
        self.tokens = completion
        if finish:
            self.last = now
            self.done.set()

    def fail(self, error):
        raise SystemExit(f"request failed: {error}")


def build_model(shape: str, device: str, dtype: str):
    from shelfsight.export import tiny
    from shelfsight.export.tokenizer import build_tokenizer
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(tiny.make_config(shape))
    return model.to(getattr(torch, dtype)).eval(), build_tokenizer()


def requests(pre, n: int):
    import random

    rng = random.Random(7)
    out = []
    for i in range(n):
        img = synth.render(synth.make_product(rng), size=(448, 448), seed=i)
        out.append(pre(synth.encode(img), synth.QUESTIONS[i % len(synth.QUESTIONS)]))
    return out


def run_engine(engine, inputs, new_tokens):
    p = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    t0 = time.perf_counter()
    sinks = []
    for x in inputs:
        s = Timed()
        engine.submit(Request(torch.from_numpy(x.input_ids), torch.from_numpy(x.pixel_values),
                              torch.from_numpy(x.image_grid_thw), f"bench-{time.perf_counter()}", p, s))
        sinks.append(s)
    for s in sinks:
        s.done.wait()
    wall = time.perf_counter() - t0
    ttft = statistics.median(s.first - s.t0 for s in sinks)
    tpot = statistics.median((s.last - s.first) / max(1, s.tokens - 1) for s in sinks)
    return wall, ttft, tpot


def run_generate(model, inputs, new_tokens, device):
    """One left-padded batch through transformers' generate()."""
    from shelfsight import qwen

    L = max(len(x.input_ids) for x in inputs)
    ids = torch.full((len(inputs), L), qwen.ENDOFTEXT_ID)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(inputs):
        ids[i, L - len(x.input_ids):] = torch.from_numpy(x.input_ids)
        mask[i, L - len(x.input_ids):] = 1
    batch = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                 mm_token_type_ids=(ids == qwen.IMAGE_PAD_ID).long().to(device),
                 pixel_values=torch.cat([torch.from_numpy(x.pixel_values) for x in inputs]).to(device),
                 image_grid_thw=torch.stack([torch.from_numpy(x.image_grid_thw) for x in inputs]).to(device))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    wall = time.perf_counter() - t0
    return wall, ttft, (wall - ttft) / max(1, new_tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "2b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.shape, args.device, args.dtype)
    pre = Preprocessor(tokenizer, PixelPolicy(), imaging.ImageLimits(), params.Limits())
    engine = Engine(model, tokenizer, EngineConfig(max_batch=64, max_waiting=512, max_prefill_tokens=16_384,
                                                   vision_cache_bytes=0))
    engine.start()
    levels = [int(c) for c in args.concurrency.split(",")]
    warm = requests(pre, 2)
    run_engine(engine, warm, 4)
    run_generate(model, warm, 4, args.device)
    print(f"# {args.shape} random Qwen3-VL, {args.device} {args.dtype}, {args.new_tokens} new tokens, 448x448")
    print("| concurrency | system | TTFT ms | ms/token | req/s | tok/s | req/s ratio |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        inputs = requests(pre, c)
        gw, gt, gp = run_generate(model, inputs, args.new_tokens, args.device)
        ew, et, ep = run_engine(engine, inputs, args.new_tokens)
        for name, (w, t, p) in (("generate()", (gw, gt, gp)), ("engine", (ew, et, ep))):
            print(f"| {c} | {name} | {t * 1000:.1f} | {p * 1000:.2f} | {c / w:.2f} | {c * args.new_tokens / w:.0f} | "
                  f"{'1.00' if name == 'generate()' else f'{gw / ew:.2f}'} |", flush=True)
    engine.stop()


if __name__ == "__main__":
    main()
