"""int4 linears per batch size: tinygemm, a dequantized dense weight, and the chosen policy, against a
plain float linear of the same shape, all measured in the same run.

    python bench/int4.py                                     # 2B decoder-layer shapes, CPU float32
    python bench/int4.py --shape tiny --dtype bfloat16
    python bench/int4.py --device cuda --dtype bfloat16      # what the threshold is for

One decoder layer's matmuls as the decode step runs them (q|k|v and gate|up joined; group 128, random
weights): per batch bucket (rows of x) and matmul, ms per matmul for the float linear ("float": the
bf16/fp32 model), Int4Linear on tinygemm, Int4Linear on its dense weight, and Int4Linear under the
threshold that qlinear.choose_int4_threshold picks here; "x float" = ms / float ms (lower is faster).
"layer" sums the four. Then the memory of each option for the layer and the whole text decoder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shelfsight.model import qlinear  # noqa: E402
from shelfsight.model.gptq import rtn_quantize  # noqa: E402

# (hidden, intermediate, q width, k/v width each, layers) of the text decoders (export/tiny.py shapes)
SHAPES = {"2b": (2048, 6144, 2048, 1024, 28), "tiny": (128, 256, 128, 64, 2)}
GROUP = 128


def layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """matmul -> (out n, in k) of one decoder layer."""
    hidden, inter, q, kv, _ = SHAPES[shape]
    return {"q|k|v": (q + 2 * kv, hidden), "o": (hidden, q), "gate|up": (2 * inter, hidden), "down": (hidden, inter)}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    """name -> (float weight [n, k], Int4Linear of its round-to-nearest codes)."""
    torch.manual_seed(0)
    out = {}
    for name, (n, k) in layer_shapes(shape).items():
        w = torch.randn(n, k, device=device) * 0.02
        out[name] = (w.to(dtype), qlinear.Int4Linear(rtn_quantize(w, 4, GROUP), device, dtype))
    return out


def nbytes(*tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure(mods, buckets, device, dtype, reps) -> dict[tuple[int, str], float]:
    """(rows, name) -> ms per call of each Int4Linear as it is set now."""
    out = {}
    for b in buckets:
        for name, (_, m) in mods.items():
            x = torch.randn(b, m.in_features, device=device, dtype=dtype)
            out[b, name] = qlinear.time_call(lambda: m(x), device, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2b", choices=tuple(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--buckets", default="1,2,4,8,16,24,32")
    ap.add_argument("--reps", type=int, default=None, help="calls per timing (default: 50 CUDA, 5 CPU)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    buckets = sorted(int(b) for b in args.buckets.split(","))
    mods = build(args.shape, device, dtype)
    int4 = [m for _, m in mods.values()]

    with torch.inference_mode():
        base = {}
        for b in buckets:
            for name, (w, m) in mods.items():
                x = torch.randn(b, m.in_features, device=device, dtype=dtype)
                base[b, name] = qlinear.time_call(lambda: F.linear(x, w), device, args.reps)
        tiny = measure(mods, buckets, device, dtype, args.reps)
        qlinear.set_int4_threshold(int4, 1)  # dense from one row on
        dense = measure(mods, buckets, device, dtype, args.reps)
        qlinear.set_int4_threshold(int4, None)
        threshold, table = qlinear.choose_int4_threshold(int4, buckets, args.reps)
        dense_bytes = qlinear.set_int4_threshold(int4, threshold)
        policy = measure(mods, buckets, device, dtype, args.reps)

    shapes = ", ".join(f"{name} {n}x{k}" for name, (n, k) in layer_shapes(args.shape).items())
    where = f"{args.device} {args.dtype}" + (f", {args.threads} threads" if device.type == "cpu" else "")
    print(f"# {args.shape} text-decoder layer ({shapes}; group {GROUP}), {where}")
    print(f"chosen threshold: {threshold if threshold is not None else 'none (tinygemm at every bucket)'}")
    print("| rows | matmul | float ms | tinygemm ms | dense ms | policy ms | tinygemm x float | dense x float "
          "| policy x float |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in buckets:
        for name in [*mods, "layer"]:
            names = list(mods) if name == "layer" else [name]
            f, t, d, p = (sum(r[b, n] for n in names) for r in (base, tiny, dense, policy))
            print(f"| {b} | {name} | {f:.3f} | {t:.3f} | {d:.3f} | {p:.3f} | {t / f:.2f} | {d / f:.2f} | {p / f:.2f} |",
                  flush=True)
    print("\nchooser's own timings (ms, one layer): " + ", ".join(
        f"{r['rows']}: {r['tinygemm_ms']:.3f} vs {r['dense_ms']:.3f}" for r in table))

    layers = SHAPES[args.shape][4]
    float_b = nbytes(*(w for w, _ in mods.values()))
    int4_b = nbytes(*(t for m in int4 for t in (m.packed, m.scales_and_zeros)))
    dense_b = sum(m.out_features * m.in_features for m in int4) * torch.empty((), dtype=dtype).element_size()
    print(f"\n| option | layer MB | text decoder MB ({layers} layers) |")
    print("|---|---|---|")
    for option, b in (("float", float_b), ("int4 tinygemm", int4_b), ("int4 + dense copy", int4_b + dense_b),
                      ("int4 policy", int4_b + dense_bytes)):
        print(f"| {option} | {b / 1e6:.2f} | {b * layers / 1e6:.1f} |")


if __name__ == "__main__":
    main()
