"""e4m3 weights read as their bytes, so FP8 kernels build on every GPU Triton supports; the
weight-only FP8 GEMV of decode steps (`fp8_gemv`, quant/fp8_gpu.py's path for up to 16 rows);
and the grouped GEMM of FP8 experts over a step's pairs sorted by expert (`fp8_grouped_gemm`:
quant/fp8_gpu.py `fp8_experts_sorted`, MoE steps past the Triton MoE's 16 tokens).

Triton's e4m3 type (fp8e4nv) exists only from sm_89 (Ada, Hopper) on: a kernel whose pointer is
an e4m3 tensor does not compile for an A100. The weight-only kernels (quant/fp8_gpu.py's
GEMV, kernels/triton_moe.py) only need the values, so they take the bytes (`bits(w)`: a uint8
view, no copy) and convert them with integer ops, as Marlin's FP8 path does on Ampere and as the
CPU kernel does (kernels/fp8_cpu.cpp): an e4m3fn byte s.eeee.mmm moved into the fp16 bit pattern
s.0eeee.mmm0000000 is the value times 2^-8 (exponent bias 15 instead of 7), subnormals included,
exact; the callers fold the 2^8 into the block scale (`UNSCALE`). e4m3fn's NaN (s.1111.111) would
read as +-480: the official checkpoints hold none (their values are clamped to +-448).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen35.kernels.triton_tiles import _out_rows, _tile_rows, gemm_warps
from qwen35.quant.formats import FP8_ROW_WIDTHS

UNSCALE = tl.constexpr(256.0)  # value = fp16 read of the moved bits * UNSCALE


@triton.jit
def e4m3_to_fp16(b):
    """uint8 e4m3fn bytes -> fp16 values / 256 (exact)."""
    i = b.to(tl.int32)
    return (((i & 0x80) << 8) | ((i & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)


def bits(w: torch.Tensor) -> torch.Tensor:
    """An e4m3 tensor's bytes (a view)."""
    assert w.dtype == torch.float8_e4m3fn, w.dtype
    return w.view(torch.uint8)


UPCAST = os.environ.get("TRITON_INTERPRET", "") == "1"  # the interpreter's bf16 dots are wrong


@triton.jit
def _dot(x, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """x [BM, K] @ w [K, N] in fp32 (w exact in x's dtype: upcast e4m3, int4 / int8 codes)."""
    if UPCAST:  # (the interpreter's bf16 dots are wrong)
        return tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(x, w.to(x.dtype), input_precision="ieee")
    return tl.dot(x, w.to(x.dtype))


MAX_ROWS = 16


@triton.jit
def _fp8_gemv_kernel(
    X, W, S, Y, M, N, K, s_xm, s_wn, s_ym, s_sn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_O: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    mn, mm = rn < N, rm < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        k = kb * BK + tl.arange(0, BK)
        mk = k < K
        x = tl.load(X + rm[:, None] * s_xm + k[None, :], mask=mm[:, None] & mk[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(W + rn[:, None] * s_wn + k[None, :], mask=mn[:, None] & mk[None, :],
                    other=0)  # fmt: skip
        scale = tl.load(S + (rn // BLOCK_O) * s_sn + kb, mask=mn, other=0.0)  # [BN]
        w = e4m3_to_fp16(w)  # the bytes' values / UNSCALE, exact in any float dtype
        acc += _dot(x, tl.trans(w), IEEE, UPCAST) * (scale * UNSCALE)[None, :]
    tl.store(Y + rm[:, None] * s_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])  # fmt: skip


def fp8_gemv(x, w, scale, block, block_n: int = 64) -> torch.Tensor:
    """y [M <= 16, N] = x @ dequant(w)^T, w e4m3 [N, K] with one scale per block (32, 64 or 128
    inputs wide: a chunk of the loop): each program takes block_n weight rows against all M
    input rows; the chunks of a row are upcast to x's dtype (exact: e4m3 fits in bf16), multiplied on the tensor
    cores and scaled by their block's scale in fp32. Numerically the dequantised-weight
    reference (no activation error). block_n: bench/gpu_kernels.py tries some."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= MAX_ROWS and block[1] in FP8_ROW_WIDTHS and x.stride(1) == 1 \
        and w.is_contiguous()  # fmt: skip
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    s = scale.float().contiguous()
    _fp8_gemv_kernel[(triton.cdiv(N, block_n),)](
        x, bits(w), s, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), s.stride(0),
        BM=MAX_ROWS, BN=block_n, BK=block[1], BLOCK_O=block[0], IEEE=x.dtype == torch.float32,
        UPCAST=UPCAST,
    )  # fmt: skip
    return y


@triton.jit
def _fp8_gemm_kernel(
    X, s_xm, XIDX, W, s_we, S, s_se, s_sr, Y, s_ym, YIDX, TILES, N, K, HALF, NBH, BLOCK_O,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (tile of BM rows of one expert, block of BN weight rows): the tile's rows of X
    (or those XIDX names) against the expert's e4m3 rows, KS inputs a step (within one scale's
    BK: 128 at once spilled registers), the bytes' values through the tensor cores in X's
    dtype (exact), each step's fp32 sums times the rows' block scales; into Y's rows (or those
    YIDX names). Weight row n's scale
    row: (n // HALF) * NBH + (n % HALF) // BLOCK_O (gate_up: the gate's blocks, then the up's,
    HALF = I rows each)."""
    pn = tl.program_id(1)
    e, row0, end, rm, mm, xr = _tile_rows(TILES, 0, XIDX, BM, True, GATHER)
    rn = pn * BN + tl.arange(0, BN)
    mn = rn < N
    rows = W + e * s_we + rn.to(tl.int64)[:, None] * K
    srows = S + e * s_se + ((rn // HALF) * NBH + (rn % HALF) // BLOCK_O) * s_sr  # [BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c in range(0, tl.where(end > row0, tl.cdiv(K, KS), 0)):  # (no rows: no weight read)
        k = c * KS + tl.arange(0, KS)
        mk = k < K
        x = tl.load(X + xr[:, None] * s_xm + k[None, :], mask=mm[:, None] & mk[None, :],
                    other=0.0)  # fmt: skip
        w = e4m3_to_fp16(tl.load(rows + k[None, :], mask=mn[:, None] & mk[None, :], other=0))
        scale = tl.load(srows + c * KS // BK, mask=mn, other=0.0)
        acc += _dot(x, tl.trans(w), IEEE, UPCAST) * (scale * UNSCALE)[None, :]
    tl.store(Y + _out_rows(YIDX, rm, mm, SCATTER)[:, None] * s_ym + rn[None, :],
             acc.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])  # fmt: skip


GEMM_BN = 64  # the grouped GEMM's weight rows a program


def fp8_grouped_gemm(x, w, scale, block, half: int, rows: int, tiles, bm: int, xidx=None,
                     yidx=None) -> torch.Tensor:  # fmt: skip
    """y [rows, N]: row i = x[xidx[i]] (or x[i]) @ dequant(w[e])^T for the expert e of its tile
    (tiles: kernels/triton_tiles.py `tile_rows` of rows sorted by expert), written to y[yidx[i]]
    (or y[i]); w [E, N, K] e4m3, scale [E, R, ceil(K / block[1])] fp32, one per block of
    block[0] rows (128, or 1) and block[1] inputs (128, or 32 / 64 with rows of one), the N rows
    in halves of `half` whose blocks start afresh (gate_up: half = I; down: half = N)."""
    E, N, K = w.shape
    bo, bk = block
    assert bk in FP8_ROW_WIDTHS and x.stride(1) == 1 and x.shape[1] == K and w.is_contiguous()
    assert scale.dtype == torch.float32 and scale.stride(2) == 1
    y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
    if not rows:
        return y
    _fp8_gemm_kernel[(tiles.shape[0], triton.cdiv(N, GEMM_BN))](  # (tiles: unread pointers)
        x, x.stride(0), tiles if xidx is None else xidx, bits(w), w.stride(0), scale,
        scale.stride(0), scale.stride(1), y, y.stride(0), tiles if yidx is None else yidx, tiles,
        N, K, half, -(-half // bo), bo, BM=bm, BN=GEMM_BN, BK=bk, KS=min(bk, 64),
        GATHER=xidx is not None, SCATTER=yidx is not None, IEEE=x.dtype == torch.float32,
        UPCAST=UPCAST, num_warps=gemm_warps(bm),
    )  # fmt: skip
    return y


fp8_gemv.kernel = _fp8_gemv_kernel  # tests/test_triton_compile.py compiles it for sm_90 / sm_80
fp8_grouped_gemm.kernel = _fp8_gemm_kernel
