"""Loading a quantized checkpoint: shelfsight's meta-device load vs the dense-then-swap load it replaced.

    python bench/load.py [--shape tiny|2b] [--device cpu|cuda] [--rounds 3]

Writes the tiny (or 2B-shaped) random model as a GPTQ-format int4 checkpoint (round-to-nearest, group
128: the file format GPTQModel writes), then loads it `rounds` times each way, every load in a fresh
process so that its peak RSS is its own. Prints the median load time, the peak RSS growth during the
load (Linux VmHWM, reset just before it; on CUDA also the peak allocated GPU memory), and the ratio
old / new. Measured on the 2-core CPU machine, 2b shape, one round: 27.3 s / 9,069 MiB old against
11.7 s / 1,926 MiB new (2.34x, 4.71x).
The old way (`dense_then_swap`, kept here as the baseline) builds the whole model with a randomly
initialised dense decoder, moves it to the device, then replaces the decoder's linears.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def dense_then_swap(path, device: str = "cpu", dtype: str = "bfloat16"):
    """The loading before the meta device: transformers builds the model with a random dense decoder,
    which goes to the device and is then replaced by the quantized linears."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from shelfsight.model import checkpoint
    from shelfsight.model.qlinear import make_linear

    info = checkpoint.inspect(path)
    compute, dev = getattr(torch, dtype), torch.device(device)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=compute).to(dev)
    modules = dict(checkpoint.quantized_modules(info.path, info.bits))  # every linear unpacked at once, as it was
    for name, q in modules.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, make_linear(q, dev, compute))
    return model.eval()


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(way: str, path: str, device: str) -> None:
    """One load in this process; prints {seconds, peak_rss_growth, peak_gpu} as JSON."""
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: F401
    from transformers.utils import logging as hf_logging

    from shelfsight.model import checkpoint, qlinear  # noqa: F401

    hf_logging.set_verbosity_error()  # the old way reports every decoder weight as missing
    AutoConfig.from_pretrained(path)  # imports and lazy modules are not part of loading
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak (VmHWM) to the current RSS
        f.write("5")
    before = rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = dense_then_swap(path, device) if way == "old" else checkpoint.load_model(path, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = rss_bytes("VmHWM") - before
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    del model
    print(json.dumps({"seconds": seconds, "peak_rss_growth": peak, "peak_gpu": gpu}))


def measure(way: str, path: Path, device: str, rounds: int) -> dict:
    runs = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, __file__, "--child", way, str(path), "--device", device],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=("tiny", "2b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.device)
    from shelfsight.export import tiny
    from shelfsight.export.quantize import write_local

    with tempfile.TemporaryDirectory(prefix="shelfsight-bench-load-") as tmp:
        bf16, int4 = Path(tmp) / "bf16", Path(tmp) / "int4"
        bf16.mkdir(), int4.mkdir()
        tiny.build(bf16, shape=args.shape)
        write_local(bf16, int4, 4, 128)
        old = measure("old", int4, args.device, args.rounds)
        new = measure("new", int4, args.device, args.rounds)
    mib = 1 << 20
    print(f"# load_model, {args.shape} int4 checkpoint on {args.device}, median of {args.rounds} fresh processes")
    print("| measure | dense then swap | meta device | ratio old/new |")
    print("|---|---|---|---|")
    print(f"| load time (s) | {old['seconds']:.3f} | {new['seconds']:.3f} | {old['seconds'] / new['seconds']:.2f} |")
    print(f"| peak RSS growth (MiB) | {old['peak_rss_growth'] / mib:.1f} | {new['peak_rss_growth'] / mib:.1f} | "
          f"{old['peak_rss_growth'] / max(new['peak_rss_growth'], 1):.2f} |")
    if args.device.startswith("cuda"):
        print(f"| peak GPU allocated (MiB) | {old['peak_gpu'] / mib:.1f} | {new['peak_gpu'] / mib:.1f} | "
              f"{old['peak_gpu'] / max(new['peak_gpu'], 1):.2f} |")


if __name__ == "__main__":
    main()
