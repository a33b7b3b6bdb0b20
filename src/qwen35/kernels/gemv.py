"""Decode GEMVs on the CPU (`gemv_cpu.cpp`): y [M, N] = x [M <= 16, K] @ W^T, W streamed once.

- `linear_bf16(x, w, avx2_only=False)`: bf16 weights (layers/linear.py);
- `linear_int8(x, q, scale)`: int8 weights, one scale per output row;
- `linear_fp8(x, w, scale, bo, bi)`: block-FP8 weights, bf16 rows, on AVX512-VBMI + BF16 CPUs
  (`fp8_supported(bi)`; quant/matmul.py).
`load_int4()` gives `int4_cpu.cpp`'s module: `linear_int4(x, packed, sz, group, n, avx2_only,
x8)` on torch's packed CPU int4 layout (x8: activations rounded to 8 bits per 32 inputs) and
`int4_dequant` (prefill's unpack), also used by quant/matmul.py.
`load_int6()` gives `int6_cpu.cpp`'s module: `linear_int6(x, packed, scales)`, lm_head in 6-bit
groups of 32 under int4 (quant/layers.py Int6Linear).
`load_screen()` gives `head_screen_cpu.cpp`'s module (`screen`, `vnni`) for
models/head_screen.py.
Each path is tested against F.linear on the (dequantised) weight, its PyTorch twin, and
`bench/gemv.py` measures it against torch's own kernels. `avx2_only=True` runs the bf16
path of CPUs without AVX512-BF16 on any machine (tests, benchmarks).
"""

from __future__ import annotations

from qwen35.kernels import Native

MAX_ROWS = 16  # rows the kernels take; more rows are a GEMM (compute-bound): torch's

GEMV = Native("gemv_cpu.cpp", ("-mavx2", "-mfma"))
INT4 = Native("int4_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"), needs=("avx2", "fma", "f16c"))
INT6 = Native("int6_cpu.cpp", ("-mavx2", "-mfma"))
# models/head_screen.py's int8 screen of lm_head (int8 x int8 dots on AVX512-VNNI CPUs, int16 x
# int8 ones on AVX2: `vnni()` says which)
SCREEN = Native("head_screen_cpu.cpp", ("-mavx2", "-mfma"), needs=("avx2", "fma"))


def load():
    """The compiled module or None (no compiler, no AVX2 + FMA, QWEN35_NO_KERNELS=1)."""
    return GEMV.load()


def load_int4():
    """`int4_cpu.cpp` (`linear_int4`, `int4_dequant`, `int4_fast_supported`), or None as `load`."""
    return INT4.load()


def load_int6():
    """`int6_cpu.cpp` (`linear_int6`), or None as `load`."""
    return INT6.load()


def load_screen():
    """`head_screen_cpu.cpp`'s module, or None as `load`."""
    return SCREEN.load()
