"""Engine runners against each other and against plain transformers generate(), same model, same run.

    python bench/engine.py                       # tiny random model on CPU: slot runner vs reference runner
    python bench/engine.py --shape 2b --device cuda --dtype bfloat16 --new-tokens 128 --generate
    python bench/engine.py --shape small --chunks 0,512,128 --no-reference --concurrency 8,16
                                                 # chunked prefill: TTFT and ms/token under load

Reports, per concurrency level (closed loop: that many requests in flight, --rounds x concurrency in
all; answers forced to --new-tokens tokens, greedy, one 448x448 product photo each): time to first
token (median and 90th percentile), ms per output token (median over requests), requests/s and tokens/s,
and the tokens/s ratio against the reference runner (or generate(), which runs each level as one
left-padded batch, its best case). --chunks runs the slot engine once per prefill chunk budget
(EngineConfig.prefill_chunk_tokens; 0 = whole prompts between two decode steps).
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

from shelfsight import params, synth  # noqa: E402
from shelfsight.engine import Engine, EngineConfig, Request  # noqa: E402
from shelfsight.model import imaging  # noqa: E402
from shelfsight.model.preprocessing import PixelPolicy, Preprocessor  # noqa: E402
from shelfsight.params import GenerationParams  # noqa: E402


class Timed:
    def __init__(self, on_done=None):
        self.t0 = time.perf_counter()
        self.first = self.last = None
        self.done = threading.Event()
        self.tokens = 0
        self.error = None
        self.on_done = on_done

    def is_cancelled(self):
        return False

    def send(self, delta, prompt, completion, finish):
        now = time.perf_counter()
        self.first = self.first or now
        self.tokens = completion
        if finish:
            self.last = now
            self.done.set()
            if self.on_done:
                self.on_done()

    def fail(self, error):
        self.error = error
        self.done.set()
        if self.on_done:
            self.on_done()


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


def closed_loop(engine, inputs, concurrency: int, request_of, what: str = "engine bench") -> tuple[list, float]:
    """`concurrency` requests in flight until all `inputs` are answered: request_of(i, x, sink) is the
    engine Request of input i. -> (the Timed sinks in submission order, wall seconds); a failure ends it."""
    todo, sinks, lock, all_done = list(enumerate(inputs)), [], threading.Lock(), threading.Event()

    def submit_next():
        with lock:
            if not todo:
                if all(s.done.is_set() for s in sinks):
                    all_done.set()
                return
            i, x = todo.pop(0)
            s = Timed(on_done=submit_next)
            sinks.append(s)
        engine.submit(request_of(i, x, s))

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(inputs))):
        submit_next()
    if not all_done.wait(1800):
        raise SystemExit(f"{what} timed out")
    wall = time.perf_counter() - t0
    failed = [s.error for s in sinks if s.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed: {failed[0]}")
    return sinks, wall


def run_engine(engine, inputs, concurrency: int, new_tokens: int) -> dict:
    """Closed loop: `concurrency` requests in flight until all `inputs` are answered."""
    p = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    sinks, wall = closed_loop(engine, inputs, concurrency, lambda i, x, s: Request(
        torch.from_numpy(x.input_ids), torch.from_numpy(x.pixels), torch.from_numpy(x.image_grid_thw),
        (f"bench-{time.perf_counter()}",), p, s))
    return {"wall_s": wall, "requests": len(sinks), "tokens": sum(s.tokens for s in sinks),
            "ttft_ms": 1000 * statistics.median(s.first - s.t0 for s in sinks),
            "ttft_p90_ms": 1000 * p90([s.first - s.t0 for s in sinks]),
            "ms_per_token": 1000 * statistics.median((s.last - s.first) / max(1, s.tokens - 1) for s in sinks),
            "req_s": len(sinks) / wall, "tok_s": sum(s.tokens for s in sinks) / wall}


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def run_generate(model, inputs, new_tokens, device) -> dict:
    """One left-padded batch through transformers' generate()."""
    from shelfsight.model import qwen

    L = max(len(x.input_ids) for x in inputs)
    ids = torch.full((len(inputs), L), qwen.ENDOFTEXT_ID)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(inputs):
        ids[i, L - len(x.input_ids):] = torch.from_numpy(x.input_ids)
        mask[i, L - len(x.input_ids):] = 1
    batch = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                 mm_token_type_ids=(ids == qwen.IMAGE_PAD_ID).long().to(device),
                 pixel_values=torch.cat([torch.from_numpy(x.pixel_values) for x in inputs]).to(device),
                 image_grid_thw=torch.cat([torch.from_numpy(x.image_grid_thw) for x in inputs]).to(device))
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    wall = time.perf_counter() - t0
    n = len(inputs)
    return {"wall_s": wall, "requests": n, "tokens": n * new_tokens, "ttft_ms": 1000 * ttft, "ttft_p90_ms": 1000 * ttft,
            "ms_per_token": 1000 * (wall - ttft) / max(1, new_tokens - 1), "req_s": n / wall,
            "tok_s": n * new_tokens / wall}


def make_engine(model, tokenizer, runner: str, max_batch: int, max_model_len: int, chunk: int = 512) -> Engine:
    engine = Engine(model, tokenizer, EngineConfig(max_batch=max_batch, max_waiting=4096, max_prefill_tokens=16_384,
                                                   max_model_len=max_model_len, vision_cache_bytes=0,
                                                   runner=runner, prefill_chunk_tokens=chunk))
    engine.start()
    return engine


def row(c, name, r, base) -> str:
    return (f"| {c} | {name} | {r['ttft_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['ms_per_token']:.2f} | {r['req_s']:.2f} | "
            f"{r['tok_s']:.0f} | "
            f"{r['tok_s'] / base['tok_s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "small", "2b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generate", action="store_true", help="also time transformers generate()")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference runner")
    ap.add_argument("--chunks", default="512", help="slot engine prefill chunk budgets to compare (0 = none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.shape, args.device, args.dtype)
    pre = Preprocessor(tokenizer, PixelPolicy(), imaging.ImageLimits(), params.Limits())
    levels = [int(c) for c in args.concurrency.split(",")]
    max_len = 512 + args.new_tokens
    chunks = [int(c) for c in args.chunks.split(",")]
    engines = {(f"slots chunk {c}" if len(chunks) > 1 else "slots"): make_engine(model, tokenizer, "slots", max(levels),
                                                                               max_len, c) for c in chunks}
    if not args.no_reference:
        engines["reference"] = make_engine(model, tokenizer, "reference", max(levels), max_len)
    warm = requests(pre, 2)
    for e in engines.values():
        run_engine(e, warm, 2, 4)
    print(f"# {args.shape} random Qwen3-VL, {args.device} {args.dtype}, {args.new_tokens} new tokens, 448x448")
    print("| concurrency | system | TTFT ms | TTFT p90 ms | ms/token | req/s | tok/s | tok/s ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        inputs = requests(pre, c * args.rounds)
        results = {}
        if args.generate:
            results["generate()"] = run_generate(model, inputs[:c], args.new_tokens, args.device)
        for name, e in engines.items():
            results[f"engine/{name}"] = run_engine(e, inputs, c, args.new_tokens)
        base = results.get("engine/reference") or results.get("generate()") or next(iter(results.values()))
        for name, r in results.items():
            print(row(c, name, r, base), flush=True)
    for e in engines.values():
        e.stop()


if __name__ == "__main__":
    main()
