"""What a CPU without AVX512 (AVX2 + FMA only, e.g. AMD Zen 3) runs, on any x86-64 machine:
the weight-format, decode-plan and CPU MoE tests again in a subprocess under
QWEN35_CPU_ISA=avx2 (our kernels' AVX2 paths, devices.py without the AVX512 / AMX flags),
ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (torch's own kernels and int4 packing as
there). Running the whole suite so found int4 reading torch's AVX2 packing wrongly (README
"Quantized weights")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TESTS = ["test_gemv_int4.py", "test_quant_int.py", "test_quant_fp8.py", "test_cpu_decode.py",
         "test_bf16_storage.py", "test_gemv.py", "test_head_screen.py",
         "test_moe_cpu.py"]  # fmt: skip


def test_weight_formats_and_decode_plan_as_on_an_avx2_cpu():
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("the AVX2 emulation hides x86 CPU flags: x86-64 Linux only")
    from qwen35.devices import cpu_flags

    if not any(f.startswith("avx512") for f in cpu_flags()):
        pytest.skip("this CPU has no AVX512: the rest of the suite runs the AVX2 paths natively")
    env = {**os.environ, "QWEN35_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "ATEN_CPU_CAPABILITY": "avx2"}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
           *(str(HERE / t) for t in TESTS)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=HERE.parent)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]
