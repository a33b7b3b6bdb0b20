"""Weight-only int4 / int6 / int8 products on CUDA, the weights in their CPU layouts
(quant/layers.py): what quant/matmul.py's int*_linear run for a GPU's rows.

Up to 64 rows (decode; 16 a call): kernels/triton_int.py's GEMVs read the packed bytes as
stored (int4: 4.25 to 5 bits a weight read a step instead of BF16's 16). Up to
DENSE_GEMM_MAX_ROWS (batched decode, short prefills): its int4 / int8 GEMM, tiles of rows
against each block of weight rows, the weight still read as stored. More rows (prefill): int4
is dequantised by one Triton kernel into quant/matmul.py's reused buffer (one layer's largest
matrix) and a cuBLAS GEMM runs on it; the int6 head (read for a few rows a step) takes the GEMV
16 rows at a time at any count; int8 dequantises in PyTorch. MoE experts (IntExperts' stacks):
the pairs kernels up to MOE_MAX_ROWS tokens, else the grouped GEMM over the pairs sorted by
expert (`int_experts_sorted`). Without Triton, or where its kernels do not build
(`fp8_gpu._built`: warned once), the PyTorch references run. UNMEASURED on a GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qwen35.layers.linear import gemm, in_chunks
from qwen35.quant import formats

MAX_ROWS = 16  # kernels/triton_int.py MAX_ROWS
# rows up to which the GEMVs run 16 at a time rather than dequantising: each call reads the int4
# weight once (0.5-0.6 B a weight), dequantising + cuBLAS moves ~4.5 (read 0.5, write and read 2
# + 2), so 4 calls still read less; more rows (prefill) are GEMM work. (Unmeasured; an estimate.)
GEMV_MAX_ROWS = 64
# Rows up to which a dense int4 / int8 product runs the GEMM kernel (the weight read as stored,
# once a tile of rows: ~0.5 B a weight from DRAM where its tiles share the L2) rather than
# dequantising + cuBLAS (~4.5 B a weight moved, then cuBLAS's full-speed GEMM): past a few hundred
# rows the product is compute-bound and cuBLAS's tiles win. (Unmeasured; an estimate:
# bench/gpu_kernels.py --only int times both at 64-4096 rows.)
DENSE_GEMM_MAX_ROWS = 256
# Tokens up to which a MoE step runs the pairs kernels (no sort; each (token, expert) pair reads
# its expert's rows); more: the grouped GEMM over the pairs sorted by expert (each active
# expert's weight read once a tile, ~10 small launches to sort and tile). The bytes decide a
# decode step: 35B-A3B (top-8 of 256), the pairs read 1.25x the distinct experts' bytes at 16
# tokens (128 pairs, ~102 experts), 2.3x at 64 (512, ~222). (Unmeasured; an estimate:
# bench/gpu_kernels.py --only int times both at 16-64 tokens.)
MOE_MAX_ROWS = 16


@functools.lru_cache(maxsize=1)
def _kernels():
    try:
        from qwen35.kernels import triton_int
    except ImportError:
        return None
    return triton_int


def _run(name: str, fn_name: str, *args):
    """kernels/triton_int.py's `fn_name`(*args), or None: no Triton, or it does not build here."""
    from qwen35.quant.fp8_gpu import _built

    kern = _kernels()
    return None if kern is None else _built(name, getattr(kern, fn_name), *args)


def int4_linear_gpu(x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int,
                    n: int) -> torch.Tensor:  # fmt: skip
    """x2 [M, K] @ W^T -> [M, n], W in Int4Linear's layout."""
    from qwen35.quant.matmul import scratch, unpack_int4

    M = x2.shape[0]
    if M <= GEMV_MAX_ROWS and x2.stride(1) == 1:
        y = _run("int4 GEMV", "int4_gemv", x2[:MAX_ROWS], packed, sz, group, n)
        if y is not None:
            return _rest(y, x2, lambda v: _kernels().int4_gemv(v, packed, sz, group, n))
    elif M <= DENSE_GEMM_MAX_ROWS and x2.stride(1) == 1:
        y = _gemm(x2, _one("int4", packed, sz, group))
        if y is not None:
            return y
    w = scratch((n, x2.shape[1]), x2.dtype, x2.device)
    if _run("int4 dequant", "int4_dequant", packed, sz, group, w) is None:
        w = formats.dequantize_int4_groups(unpack_int4(packed, n, x2.shape[1]), sz, group,
                                           x2.dtype)  # fmt: skip
    return gemm(x2, w)


def int6_linear_gpu(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ W^T, W in Int6Linear's layout (lm_head under int4): the GEMV, 16 rows a call
    (the head runs on a few rows a step), else the PyTorch reference (activations not rounded)."""
    x2 = x2.contiguous()
    y = _run("int6 GEMV", "int6_gemv", x2[:MAX_ROWS], packed, scales)
    if y is not None:
        return _rest(y, x2, lambda v: _kernels().int6_gemv(v, packed, scales))
    return F.linear(x2, formats.dequantize_int6(packed, scales, x2.dtype))


def _rest(y: torch.Tensor, x2: torch.Tensor, gemv) -> torch.Tensor:
    """y (the first MAX_ROWS rows' products) with the other rows' by `gemv`, 16 rows a call."""
    if x2.shape[0] <= MAX_ROWS:
        return y
    return torch.cat([y, in_chunks(gemv, x2[MAX_ROWS:], MAX_ROWS)])


def int8_linear_gpu(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x2 [M, K] @ (q * scale)^T by the int8 GEMV (up to GEMV_MAX_ROWS rows, 16 a call) or GEMM
    (up to DENSE_GEMM_MAX_ROWS), or None (more rows, no kernel): the caller dequantises."""
    M = x2.shape[0]
    if M > DENSE_GEMM_MAX_ROWS or x2.stride(1) != 1 or not scale.is_contiguous():
        return None
    if M > GEMV_MAX_ROWS:
        return _gemm(x2, _one("int8", q, scale, 0))
    y = _run("int8 GEMV", "int8_gemv", x2[:MAX_ROWS], q, scale)
    return None if y is None else _rest(y, x2, lambda v: _kernels().int8_gemv(v, q, scale))


def _one(kind: str, weight: torch.Tensor, scales: torch.Tensor, group: int):
    """One matrix as a ProjStack of one expert (views)."""
    from qwen35.quant.layers import ProjStack

    return ProjStack(kind, weight[None], scales[None], group)


def _gemm(x2: torch.Tensor, proj) -> torch.Tensor | None:
    """x2 @ W^T by kernels/triton_int.py's GEMM (tiles of rows by their count), or None."""
    if _kernels() is None:
        return None
    from qwen35.kernels.triton_tiles import gemm_bm

    M = x2.shape[0]
    return _run(f"{proj.kind} GEMM", "int_gemm", x2, proj, M, None, gemm_bm(M))


def int_experts_gpu(x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor, stack,
                    backend=None) -> torch.Tensor | None:  # fmt: skip
    """The routed experts of up to MOE_MAX_ROWS tokens from IntExperts' stacked weights
    ((gate_up, down) ProjStacks, int4 or int8 each): the picked experts' gate_up rows for each (token, choice)
    pair by one kernel, SwiGLU, their down rows by another, weighted and summed per token; no
    host sync (capturable in a decode graph). None: more tokens, or no kernel (the caller's
    expert loop then)."""
    if x.shape[0] > MOE_MAX_ROWS:
        return None
    from qwen35.ops.pointwise import silu_mul

    T, k = top_idx.shape
    idx = top_idx.reshape(-1).contiguous()
    gu_s, dn_s = stack
    gu = _run("int MoE", "expert_pairs", x.contiguous(), k, idx, gu_s, k)
    if gu is None:
        return None
    gate, up = gu.chunk(2, dim=-1)
    h = silu_mul(backend, gate, up).contiguous()  # [T k, I]
    ys = _kernels().expert_pairs(h, 1, idx, dn_s, k)
    return (ys.view(T, k, -1) * top_w[..., None]).sum(1)  # [T, H]


def int_experts_sorted(x, top_idx, top_w, stack, backend=None) -> torch.Tensor | None:
    """The routed experts of a step of any size from IntExperts' stacked weights by
    kernels/triton_int.py's grouped GEMM over the pairs sorted by expert (ops/moe.py
    `tiled_experts`: no host sync, deterministic). None: no kernel."""
    from qwen35.ops.moe import tiled_experts

    if _kernels() is None:
        return None
    gu_s, dn_s = stack

    def gemm(which, inp, rows, tiles, bm, xidx, yidx):
        proj = gu_s if which == "gate_up" else dn_s
        return _run("int MoE GEMM", "int_gemm", inp, proj, rows, tiles, bm, xidx, yidx)

    return tiled_experts(x, top_idx, top_w, gu_s.shape[0], gemm, backend)
