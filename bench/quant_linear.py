"""One projection (default 3584 x 1024 and 1024 x 3584, Qwen3.5-0.8B's MLP) at 1..256 rows:
BF16 GEMM vs each quantized format's two paths (direct kernel / dequantise + GEMM), interleaved.
This is what sets INT8_MAX_ROWS / INT4_MAX_ROWS / fp8 MAX_ROWS in qwen35/quant/matmul.py.

    python bench/quant_linear.py [--n 3584 --k 1024] [--threads 2] [--rows 1,2,4,8,16,64,256]

int4: torch's kernel ("int4 k"), ours for <= 16 rows ("int4 ours", int4_cpu.cpp), and our
K-major unpack (int4_dequant) + a BF16 GEMM ("int4 dq"); the unpack alone is timed first, the
vector K-major path against the scalar row-major reference.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qwen35.benchmarks.common import median_seconds
from qwen35.kernels import fp8 as fp8_kernel
from qwen35.kernels import gemv
from qwen35.quant import formats, matmul
from qwen35.quant.layers import Int4Linear, Int8Linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3584)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", default="1,2,4,8,16,64,256")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    w = (torch.randn(a.n, a.k) * 0.02).bfloat16()
    i8 = Int8Linear.quantize(w, torch.bfloat16)
    i4 = Int4Linear.quantize(w, 128, torch.bfloat16)
    q8, s8 = formats.quantize_fp8_blocks(w)
    s8 = s8.float()
    mod = fp8_kernel.load()
    buf = torch.empty(a.n, a.k, dtype=torch.bfloat16)
    mod4 = gemv.load_int4()
    print(f"[{a.n} x {a.k}], {torch.get_num_threads()} threads; ms per call (median)")
    if mod4 is not None:
        wt = torch.empty(a.k, a.n, dtype=torch.bfloat16).t()
        args = (i4.weight, i4.scales_and_zeros, 128)
        row_ms = median_seconds(lambda: mod4.int4_dequant(*args, buf), a.reps) * 1e3
        kmaj_ms = median_seconds(lambda: mod4.int4_dequant(*args, wt), a.reps) * 1e3
        gw = a.n * a.k / 1e6
        print(
            f"int4_dequant: scalar [N, K] {row_ms:.3f} ms ({gw / row_ms:.2f} G weights/s), "
            f"vector [K, N] {kmaj_ms:.3f} ms ({gw / kmaj_ms:.2f} G weights/s)"
        )
    paths = _paths(1, None, w, i8, i4, q8, s8, mod, mod4, buf)
    print(f"{'rows':>5} " + " ".join(f"{p:>9}" for p in paths))
    for m in (int(r) for r in a.rows.split(",")):
        x = torch.randn(m, a.k).bfloat16()
        cells = [f"{m:>5}"]
        for fn in _paths(m, x, w, i8, i4, q8, s8, mod, mod4, buf).values():
            cells.append(f"{median_seconds(fn, a.reps) * 1e3:9.3f}" if fn else f"{'-':>9}")
        print(" ".join(cells))


def _int4_dq(x, i4, mod4):
    wt = matmul.scratch((i4.in_features, i4.out_features), x.dtype, x.device)  # W^T [K, N]
    mod4.int4_dequant(i4.weight, i4.scales_and_zeros, 128, wt.t())
    return F.linear(x, wt.t())


def _paths(m, x, w, i8, i4, q8, s8, mod, mod4, buf) -> dict:
    return {
        "bf16": lambda: torch.mv(w, x[0]) if m == 1 else F.linear(x, w),
        "int8 k": lambda: torch.ops.aten._weight_int8pack_mm(x, i8.weight, i8.weight_scale),
        "int8 dq": lambda: F.linear(x, torch.mul(i8.weight, i8.weight_scale[:, None], out=buf)),
        "int4 k": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, i4.weight, 128, i4.scales_and_zeros
        ),
        "int4 ours": (
            lambda: mod4.linear_int4(x, i4.weight, i4.scales_and_zeros, 128, i4.out_features)
        )
        if mod4 and m <= 16
        else None,
        "int4 dq": (lambda: _int4_dq(x, i4, mod4)) if mod4 else None,
        "fp8 k": (lambda: mod.fp8_linear(x, q8, s8, 128, 128)) if mod and m <= 16 else None,
        "fp8 dq": (lambda: matmul.fp8_linear(x, q8, s8, (128, 128))) if m > 16 else None,
    }


if __name__ == "__main__":
    main()
