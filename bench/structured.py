"""Structured answers: what a constrained request costs per token against a free one, same engine, same run.

    python bench/structured.py                    # tiny random model on CPU, concurrency 1, 8, 32
    python bench/structured.py --device cuda --dtype bfloat16 --shape 2b --new-tokens 128

Per concurrency level (closed loop: that many requests in flight, --rounds x concurrency in all, one
448x448 product photo each, sampled with the study's default parameters and a seed): free requests
(ignore_eos, so each takes exactly --new-tokens tokens) and constrained ones under a JSON schema whose
one string must be longer than the budget allows (so each ends at "length" after exactly --new-tokens
tokens, without ignore_eos; the grammar is inside a JSON string, the state most of a real answer is in). The
cost ratios are constrained / free: of ms per token (median over requests), of wall time per token
(free tok/s / constrained tok/s), and of this process's CPU time per token (all threads; on a machine
shared with other work the wall-clock ratios move with its load, CPU time much less).

Then the grammar's own host work per step, measured apart from the model: advancing `c` matchers by a
token and filling their bitmask (xgrammar's batch matcher), and building + adding the [c, V] bias.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import build_model, closed_loop, make_engine, requests  # noqa: E402
from shelfsight import params  # noqa: E402
from shelfsight.engine import Request, sampling  # noqa: E402
from shelfsight.engine.batch import Row  # noqa: E402
from shelfsight.engine.grammar import RowMasks  # noqa: E402
from shelfsight.formats import parse  # noqa: E402
from shelfsight.model import imaging  # noqa: E402
from shelfsight.model.preprocessing import PixelPolicy, Preprocessor  # noqa: E402
from shelfsight.params import GenerationParams  # noqa: E402

# the string cannot close within any budget here (a token is at most a few dozen characters), so every
# constrained answer takes exactly --new-tokens tokens
LONG = parse("json_schema", {"type": "object", "additionalProperties": False, "required": ["text"],
                             "properties": {"text": {"type": "string", "minLength": 4096, "maxLength": 100_000}}})


def run(engine, inputs, concurrency: int, new_tokens: int, constrained: bool) -> dict:
    """Closed loop: `concurrency` requests in flight until all `inputs` are answered."""
    def request_of(i, x, sink):
        p = GenerationParams(max_new_tokens=new_tokens, seed=i, ignore_eos=not constrained)
        return Request(torch.from_numpy(x.input_ids), torch.from_numpy(x.pixels), torch.from_numpy(x.image_grid_thw),
                       (f"bench-{time.perf_counter()}",), p, sink, response_format=LONG if constrained else None)

    cpu0 = time.process_time()
    sinks, wall = closed_loop(engine, inputs, concurrency, request_of, "structured bench")
    cpu = time.process_time() - cpu0
    tokens = sum(s.tokens for s in sinks)
    if tokens != len(sinks) * new_tokens:
        raise SystemExit(f"expected {new_tokens} tokens a request, got {tokens / len(sinks):.1f} on average")
    return {"ms_per_token": 1000 * statistics.median((s.last - s.first) / max(1, s.tokens - 1) for s in sinks),
            "tok_s": tokens / wall, "cpu_ms_per_token": 1000 * cpu / tokens}


def mask_costs(engine, tokenizer, rows_n: int, vocab: int, steps: int = 50) -> dict:
    """Host work of one constrained step for `rows_n` rows, apart from the model (ms)."""
    grammars = engine.grammars()
    compiled = grammars.compile(LONG)
    masks = RowMasks(rows_n, vocab, pin=False)
    rows = [Row(None, slot, 0, None, matcher=grammars.matcher(compiled)) for slot in range(rows_n)]
    prefix = '{"text": "'
    for r in rows:
        r.matcher.accept_string(prefix)
    word = tokenizer.encode(" shelf")[0]  # a token any JSON string accepts
    fill = advance = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        masks.advance(rows, [word] * rows_n)
        t1 = time.perf_counter()
        host = masks.fill_slots(rows)
        t2 = time.perf_counter()
        advance, fill = advance + t1 - t0, fill + t2 - t1
    logits = torch.randn(rows_n, vocab)
    bitmask = host[:rows_n].clone()
    sampling.bitmask_bias(bitmask, vocab)
    t0 = time.perf_counter()
    for _ in range(steps):
        _ = logits + sampling.bitmask_bias(bitmask, vocab)
    bias = time.perf_counter() - t0
    return {"advance": 1000 * advance / steps, "fill": 1000 * fill / steps, "bias": 1000 * bias / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "2b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs of each kind per level (median)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.shape, args.device, args.dtype)
    vocab = model.lm_head.weight.shape[0]
    pre = Preprocessor(tokenizer, PixelPolicy(), imaging.ImageLimits(), params.Limits())
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = make_engine(model, tokenizer, "slots", max(levels), 512 + args.new_tokens)
    warm = requests(pre, 2)
    t0 = time.perf_counter()
    engine.grammars().compile(LONG)  # the vocabulary (once per engine) and the schema (once per text)
    first_compile = time.perf_counter() - t0
    # before the engine thread has run torch: two threads' OpenMP pools would compete for the cores
    masks = {c: mask_costs(engine, tokenizer, c, vocab) for c in levels}
    for constrained in (False, True):
        run(engine, warm, 2, 4, constrained)
    print(f"# {args.shape} random Qwen3-VL, {args.device} {args.dtype}, {args.new_tokens} new tokens, "
          f"{args.threads} torch threads; grammar set-up (vocabulary + first compile) {first_compile:.2f} s")
    print("| concurrency | free ms/token | constrained ms/token | cost ratio | free tok/s | constrained tok/s "
          "| cost ratio | free CPU ms/token | constrained CPU ms/token | cost ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        inputs = requests(pre, c * args.rounds)
        for constrained in (False, True):  # the first run at a new batch size pays for fresh allocations
            run(engine, inputs[:c], c, 8, constrained)
        # alternate free and constrained runs so that drifting machine load hits both alike; medians
        free, con = [], []
        for _ in range(args.repeats):
            free.append(run(engine, inputs, c, args.new_tokens, False))
            con.append(run(engine, inputs, c, args.new_tokens, True))
        f = {k: statistics.median(r[k] for r in free) for k in free[0]}
        g = {k: statistics.median(r[k] for r in con) for k in con[0]}
        print(f"| {c} | {f['ms_per_token']:.2f} | {g['ms_per_token']:.2f} | {g['ms_per_token'] / f['ms_per_token']:.3f} "
              f"| {f['tok_s']:.0f} | {g['tok_s']:.0f} | {f['tok_s'] / g['tok_s']:.3f} | {f['cpu_ms_per_token']:.2f} "
              f"| {g['cpu_ms_per_token']:.2f} | {g['cpu_ms_per_token'] / f['cpu_ms_per_token']:.3f} |", flush=True)
    engine.stop()
    print()
    print("Grammar host work per step, apart from the model (ms):")
    print("| rows | advance matchers | fill bitmask | bias [rows, V] + add | total |")
    print("|---|---|---|---|---|")
    for c, m in masks.items():
        print(f"| {c} | {m['advance']:.3f} | {m['fill']:.3f} | {m['bias']:.3f} | {sum(m.values()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
