"""`make bench`: every CPU benchmark in bench/, one after another, each with its own CPU defaults.

    python bench/run_all.py [--only preprocess,engine] [--timeout SECONDS]

Each benchmark runs as its own process (its own process group) under a time bound; past it, SIGTERM
makes the benchmark leave its `with TritonServer` blocks, which stop the tritonserver it started (that
one runs in a session of its own); its tables are printed as they come, and what it wrote to stderr only
if it failed. The end is a table of how each one went; the exit code is 1 if any failed or ran out
of time. Benchmarks are run one at a time because two of them start a tritonserver and all of them
measure speed on a shared CPU.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> time bound in seconds at its CPU defaults: about 5x what the project's 2-core machine took
# (39, 43, 118, 91 and ~240 s), so a slow or busy machine finishes and a hung one does not stall the rest
BENCHMARKS = {
    "preprocess": 240,
    "engine": 240,
    "pipeline": 600,
    "gateway": 480,
    "perceptual_pairs": 3600,  # the full pair set under three rules: ~12 min here
    "load": 240,  # 6 fresh processes that each load the tiny int4 checkpoint: ~40 s here
    "gateway_memory": 300,  # three fresh processes, 160 pictures each: ~75 s here
    "search": 600,  # embed at batch 1/8/32 both ways, 20k vectors in Postgres and FAISS: ~120 s here
    "structured": 720,  # free vs constrained requests at c=1, 8, 32, three times each: ~150 s here
    "int4": 600,  # tinygemm vs dense per batch bucket, 2B layer shapes, bf16 and fp32: ~65 s here
}
STDERR_TAIL = 3000  # characters of a failed benchmark's stderr worth showing


def run_one(name: str, timeout: float) -> tuple[str, float]:
    """Run bench/<name>.py; returns (status, seconds). Its stdout goes straight to ours."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py")], stderr=err, start_new_session=True,
                                env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return f"timed out after {timeout:.0f} s", time.perf_counter() - t0
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): take its tritonserver down too
                stop_group(proc)
        seconds = time.perf_counter() - t0
        if rc == 0:
            return "ok", seconds
        err.seek(0)
        tail = err.read().decode(errors="replace")[-STDERR_TAIL:]
        print(f"\n[{name}] exited with code {rc}; the end of its stderr:\n{tail}", file=sys.stderr, flush=True)
        return f"failed (exit code {rc})", seconds


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the benchmark's process group (the benchmark then stops its own tritonserver), SIGKILL
    if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--timeout", type=float, help="time bound per benchmark in seconds (default: its own)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    results = {}
    for name in names:
        bound = args.timeout or BENCHMARKS[name]
        print(f"\n## bench/{name}.py (time bound {bound:.0f} s)\n", flush=True)
        results[name] = run_one(name, bound)
    print("\n## summary\n\n| benchmark | result | seconds |\n|---|---|---|")
    for name, (status, seconds) in results.items():
        print(f"| {name} | {status} | {seconds:.0f} |")
    return 0 if all(status == "ok" for status, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
