"""`make demo`: the main job on the embedded tiny model, end to end, printing what happens.

Builds the tiny random Qwen3-VL checkpoint, quantizes it to int4 with GPTQ, and reports what was made.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "demo"


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from shelfsight.export import tiny
    from shelfsight.export.quantize import QuantizeJob, run

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    step("building the tiny random Qwen3-VL checkpoint (real format, real Qwen tokenizer)")
    t0 = time.perf_counter()
    src = WORK / "tiny"
    src.mkdir()
    tiny.build(src, seed=0)
    print(f"   {src.relative_to(ROOT)} in {time.perf_counter() - t0:.1f}s:")
    for f in sorted(src.iterdir()):
        print(f"     {f.name:28s} {f.stat().st_size / 1e6:8.2f} MB")

    step("quantizing the text decoder to int4 with GPTQ (GPTQModel, in the export environment)")
    manifest = run(QuantizeJob(model=src, scheme="int4", out=WORK / "tiny-int4"), log=lambda m: print("  ", m))
    print(f"   {(WORK / 'tiny-int4').relative_to(ROOT)}: quantized in {manifest['time_s']['quantize']}s")
    print("   fidelity against bf16 on held-out samples:")
    print("     GPTQ int4:", json.dumps(manifest["fidelity"]))
    print("     RTN  int4:", json.dumps(manifest["fidelity_rtn"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
