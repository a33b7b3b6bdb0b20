#!/usr/bin/env bash
# The second prepared H200 call (device tool), for the device time left after bench/gpu_check.sh
# (~150 s): what that script leaves out.
#   1. FP8 MoE decode: Qwen3.5-35B-A3B-FP8 with random e4m3 weights (drawn directly, ~35 GB): the
#      Triton MoE reading FP8 experts as stored, decode CUDA graphs, the weight-only FP8 GEMV for
#      the dense projections (kernels per token and GPU-busy fraction in the table).
#   2. Long-context decode of Qwen3.5-0.8B at 1K and 32K tokens (split-K decode attention).
# Same wheels as gpu_check.sh (.whl/, carried): run(command="bash bench/gpu_check_more.sh",
#   carry=[".whl"], timeout_s=170). Results under $OUT (more.log, JSON documents).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QWEN35_NO_KERNELS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD/tests"
LOG="$OUT/more.log"
step() {  # step SECONDS NAME COMMAND...
  local secs=$1 name=$2
  shift 2
  echo "=== $name ($(date -u +%T))" | tee -a "$LOG"
  timeout "$secs" "$@" 2>&1 | tee -a "$LOG" | tail -25
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}
B="python3 -m qwen35.cli bench --device cuda"
step 90 "35B-A3B-FP8 decode" $B --model Qwen3.5-35B-A3B-FP8 --workload decode --no-baseline \
  --out "$OUT/35b_fp8_decode.json"
step 55 "0.8B long-context decode" $B --model Qwen3.5-0.8B --workload long-context \
  --contexts 1024,32768 --no-baseline --out "$OUT/08b_long.json"
date -u | tee -a "$LOG"
