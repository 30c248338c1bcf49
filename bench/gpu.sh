#!/usr/bin/env bash
# The GPU engine bench in one device call (<= 7.5 min): bf16 and int4 (RTN-packed random weights), the
# engine in process and through Triton pipeline_stream, next to transformers generate(), 2B shape,
# 448x448 photos, 128 greedy tokens. Results: $OUT/results.md (issue 23's four rows against their targets,
# the TTFT breakdown at concurrency 1, every measured level) + $OUT/*.json (raw).
#
#   source .gpu/host-env.sh && bash bench/gpu.sh            # on the GPU host
#   bash bench/gpu.sh --device cpu                          # rehearsal here: tiny model, fp32, CPU
#   GPU_BENCH_STAGES="checkpoint triton-bf16 report" bash bench/gpu.sh   # a subset of the stages
#
# Every stage has its own time bound; a stage that fails or runs out of time prints its error and the
# script goes on. Progress lines carry the seconds since the start.
set -u
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE="${2:-cuda}"
DEVICE=${GPU_BENCH_DEVICE:-$DEVICE}
OUT=${OUT:-./out}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && [ "$DEVICE" = cpu ] && PY="$ROOT/.venv/bin/python"
WORK=${GPU_BENCH_WORK:-$(mktemp -d /tmp/gpu-bench.XXXXXX)}
START=$(date +%s)
if [ "$DEVICE" = cuda ]; then
  COMMON=(--work "$WORK" --out "$OUT" --shape 2b --device cuda --dtype bfloat16 --new-tokens 128
          --concurrency 1,8,32 --rounds 2 --threads 2 --label "2B shape, random weights, cuda bf16")
  T_CKPT=75; T_ENGINE=90; T_TRITON=95; T_BREAK=40
else
  COMMON=(--work "$WORK" --out "$OUT" --shape tiny --device cpu --dtype float32 --new-tokens 16
          --concurrency 1,4 --rounds 1 --threads 2 --preprocess-instances 1 --label "tiny, cpu fp32 rehearsal")
  T_CKPT=120; T_ENGINE=240; T_TRITON=300; T_BREAK=120
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

say() { echo "[$(( $(date +%s) - START ))s] $*"; }
BUDGET=${GPU_BENCH_BUDGET:-$([ "$DEVICE" = cuda ] && echo 440 || echo 1300)}  # whole script, seconds
STAGES=${GPU_BENCH_STAGES:-}  # e.g. "checkpoint triton-bf16 report": a shorter call; empty: all
stage() {  # stage NAME SECONDS ARGS... (the limit shrinks to what the budget has left, 15 s kept for the report)
  local name=$1 limit=$2; shift 2
  if [ -n "$STAGES" ] && [[ " $STAGES " != *" $name "* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  [ "$name" = report ] && left=$(( left + 15 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then say "stage $name: SKIPPED (budget of ${BUDGET}s spent)"; return; fi
  say "stage $name: start (limit ${limit}s)"
  # streamed as it comes (a cut-off call still shows its progress), minus progress bars
  timeout --kill-after=10 "$limit" "$PY" "$ROOT/bench/gpu/stages.py" "$@" 2>&1 \
    | grep --line-buffered -v -E "Loading weights|Writing model shards|it/s\]$"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then say "stage $name: ok"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "stage $name: TIMED OUT after ${limit}s (partial results kept)"
  else say "stage $name: FAILED rc=$rc (going on)"; fi
}

say "device=$DEVICE work=$WORK out=$OUT python=$PY"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
stage checkpoint "$T_CKPT" checkpoint "${COMMON[@]}"
stage engine-bf16 "$T_ENGINE" engine --scheme bf16 --generate "${COMMON[@]}"
stage breakdown "$T_BREAK" breakdown --scheme bf16 "${COMMON[@]}"
stage triton-bf16 "$T_TRITON" triton --scheme bf16 "${COMMON[@]}"
stage triton-int4 "$T_TRITON" triton --scheme int4 "${COMMON[@]}"
stage engine-int4 "$T_ENGINE" engine --scheme int4 "${COMMON[@]}"
stage report 30 report "${COMMON[@]}"
[ -z "${GPU_BENCH_WORK:-}" ] && rm -rf "$WORK"
say "done"
