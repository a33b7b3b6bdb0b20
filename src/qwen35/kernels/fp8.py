"""The block-FP8 CPU kernels (`fp8_cpu.cpp`), compiled on first use like the DeltaNet kernel.

- `fp8_linear(x [M<=16, K], w [N, K] fp8, scale [nbo, nbi] fp32, bo, bi, avx2_only=False)
  -> y [M, N]`: decode rows read the FP8 weight directly (1 byte per weight from memory), any
  AVX2 + F16C CPU (on AVX512 CPUs built with VL's 32 registers: 3-4 rows in one pass, the same
  bits; `avx2_only` runs the AVX2 build there, for tests and benchmarks);
- `fp8_linear_many(xs, ws, scales, bo, bi, avx2_only=False)`: [fp8_linear(x_c, w_c, scale_c)]
  stacked, in one parallel_for (a MoE layer's picked FP8 experts; each row the same bits);
- `fp8_dequant(w, scale, out, bo, bi)`: the weight in out's dtype (prefill's GEMM input).
On AVX512-VBMI + BF16 CPUs, bf16 decode rows take `gemv_cpu.cpp`'s `linear_fp8` instead
(quant/matmul.py). Their PyTorch twins are `qwen35.quant.formats.dequantize_fp8_blocks`
(+ `F.linear`); callers use those when `load()` returns None (no compiler, no AVX2/F16C,
QWEN35_NO_KERNELS=1).
"""

from __future__ import annotations

from qwen35.kernels import Native

MAX_ROWS = 16  # rows fp8_linear takes; longer inputs dequantise and run a GEMM

FP8 = Native("fp8_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"), needs=("avx2", "fma", "f16c"))


def load():
    """The compiled module or None (a failed build is logged once)."""
    return FP8.load()
