#!/usr/bin/env bash
# The second prepared H200 call (device tool), for the device time left after bench/gpu_check.sh
# (~170 s): what that script leaves out.
#   1. bench/gpu_kernels.py: each of our decode kernels against the path it replaced, at the real
#      shapes (Triton MoE vs grouped GEMM, BN 16/32/64; FP8 GEMV vs quantize + scaled GEMM;
#      split-K vs unsplit decode attention at 1K-32K; DeltaNet gates in the kernel vs apart).
#   2. FP8 MoE decode: Qwen3.5-35B-A3B-FP8 with random e4m3 weights (drawn directly, ~35 GB): the
#      Triton MoE reading FP8 experts as stored, decode CUDA graphs, the weight-only FP8 GEMV for
#      the dense projections (kernels per token and GPU-busy fraction in the table).
# Same wheels as gpu_check.sh (.whl/, carried): run(command="bash bench/gpu_check_more.sh",
#   carry=[".whl"], timeout_s=190). Results under $OUT (more.log, JSON documents).
source bench/gpu_env.sh  # OUT, the wheels, PYTHONPATH, step()
LOG="$OUT/more.log"
B="python3 -m qwen35.cli bench --device cuda"
step 90 "kernels vs what they replaced" python3 bench/gpu_kernels.py --out "$OUT/kernels.json"
step 85 "35B-A3B-FP8 decode" $B --model Qwen3.5-35B-A3B-FP8 --workload decode --no-baseline \
  --out "$OUT/35b_fp8_decode.json"
date -u | tee -a "$LOG"
