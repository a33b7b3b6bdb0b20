"""Weight-only int4 / int6 / int8 GEMVs on the GPU, reading the CPU formats' bytes as stored.

`--quantization int4` (or a 4-bit checkpoint: GPTQ, AWQ, compressed-tensors, GGUF) keeps the
weights in quant/layers.py's formats on every device, so the loader, the packing of projections
and the planner's byte counts are the CPU's. The GPU reads them here, for decode-sized inputs
(up to MAX_ROWS rows; quant/int_gpu.py dequantises for more):

- int4 (`Int4Linear`: torch's CPU layout, blocks of 64 rows whose bytes are K-major, row d of
  the block in the low nibble and row d + 32 in the high one; scales_and_zeros [K/g, N, 2],
  W = (q - 8) * scale + zero): one program per block of 64 rows (and a share of K), each chunk
  of g inputs a contiguous [g, 32] byte tile; the nibbles minus 8 (exact in bf16) go through
  the tensor cores against x and the group's scale and zero are applied to the fp32 sums:
  y = sum_g s (x . (q - 8)) + z (sum x). The dequantised-weight product up to fp32 summation
  order, activations not rounded (the CPU's decode kernels round them to 8 bits: Int4Linear.x8
  is a CPU setting).
- int6 (`Int6Linear`, lm_head under int4: 48 bytes per 64 inputs, formats.quantize_int6_groups):
  each group of 32 inputs gathered from its 16 nibble bytes and 16 top-bit bytes.
- int8 (`Int8Linear`: per-row scales).

A matrix with few row blocks (o_proj: 4096 rows = 64 blocks on a GPU of 132 SMs) splits K over
several programs, whose fp32 partial sums are added in a fixed order (`splits`: by the matrix's
shape only, so a row's result does not depend on the batch). UNMEASURED on a GPU (written
without one): tests/test_triton_kernels.py checks them against the PyTorch references under
TRITON_INTERPRET=1, tests/test_triton_compile.py compiles them for sm_90 / sm_80.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.triton_fp8 import UPCAST, _dot
from qwen35.kernels.triton_tiles import _out_rows, _tile_rows, gemm_warps

MAX_ROWS = 16
ROW_BLOCK = 64  # int4 layout: rows per block (quant/matmul.py INT4_ROW_BLOCK)
BN = 64  # int6 / int8: weight rows per program
PROGRAMS = 264  # split K until about this many programs run (2 per SM of an H100 / H200)


@triton.jit
def _group_sz(SZ, c, N, n_lo):
    """Group c's (scale, zero) of a 64-row block's rows n_lo (low nibbles) and n_lo + 32 (high
    ones), fp32: scales_and_zeros [K/g, N, 2] -> (s_lo, z_lo, s_hi, z_hi), [32] each."""
    sz = SZ + (c * N + n_lo).to(tl.int64) * 2
    f32 = tl.float32
    return (tl.load(sz).to(f32), tl.load(sz + 1).to(f32), tl.load(sz + 64).to(f32),
            tl.load(sz + 65).to(f32))  # fmt: skip


@triton.jit
def _dequant_tile(b, SZ, c, N, n_lo):
    """A [GROUP, 32] byte tile of group c -> its rows' weights (lo, hi) [GROUP, 32] fp32:
    (q - 8) * scale + zero."""
    s_lo, z_lo, s_hi, z_hi = _group_sz(SZ, c, N, n_lo)
    w_lo = ((b & 15) - 8).to(tl.float32) * s_lo[None, :] + z_lo[None, :]
    w_hi = ((b >> 4) - 8).to(tl.float32) * s_hi[None, :] + z_hi[None, :]
    return w_lo, w_hi


@triton.jit
def _int4_gemv_kernel(
    X, W, SZ, P, M, N, K, s_xm, s_pz, s_pm, CHUNKS,
    BM: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    blk, part = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, 32)
    rm = tl.arange(0, BM)
    mm = rm < M
    kk = tl.arange(0, GROUP)
    n_lo = blk * 64 + r  # the block's rows in the low nibbles; n_lo + 32 in the high ones
    base = W + blk.to(tl.int64) * 32 * K  # a block: K bytes of 32 (K-major)
    acc_lo = tl.zeros((BM, 32), dtype=tl.float32)
    acc_hi = tl.zeros((BM, 32), dtype=tl.float32)
    c0 = part * CHUNKS
    c1 = tl.minimum(c0 + CHUNKS, K // GROUP)
    for c in range(c0, c1):
        k = c * GROUP + kk
        x = tl.load(X + rm[:, None] * s_xm + k[None, :], mask=mm[:, None], other=0.0)
        b = tl.load(base + k[:, None] * 32 + r[None, :]).to(tl.int32)  # [GROUP, 32]
        s_lo, z_lo, s_hi, z_hi = _group_sz(SZ, c, N, n_lo)
        xs = tl.sum(x.to(tl.float32), 1)[:, None]  # [BM, 1]: the zeros' factor
        d_lo = _dot(x, (b & 15) - 8, IEEE, UPCAST)
        d_hi = _dot(x, (b >> 4) - 8, IEEE, UPCAST)
        acc_lo += d_lo * s_lo[None, :] + xs * z_lo[None, :]
        acc_hi += d_hi * s_hi[None, :] + xs * z_hi[None, :]
    out = P + part * s_pz + rm[:, None] * s_pm
    tl.store(out + n_lo[None, :], acc_lo.to(P.dtype.element_ty), mask=mm[:, None])
    tl.store(out + (n_lo + 32)[None, :], acc_hi.to(P.dtype.element_ty), mask=mm[:, None])


@triton.jit
def _int4_dequant_kernel(W, SZ, OUT, N, K, s_on, s_we, s_se, s_oe, GROUP: tl.constexpr):
    """OUT [E, N, K] = (q - 8) * scale + zero, one [64 rows, GROUP] tile of one matrix a program
    (E matrices: stacked experts; strides s_we, s_se, s_oe between them)."""
    blk, c, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    W, SZ, OUT = W + e * s_we, SZ + e * s_se, OUT + e * s_oe
    r = tl.arange(0, 32)
    k = c * GROUP + tl.arange(0, GROUP)
    n_lo = blk * 64 + r
    b = tl.load(W + blk.to(tl.int64) * 32 * K + k[:, None] * 32 + r[None, :]).to(tl.int32)
    sz = SZ + (c * N + n_lo).to(tl.int64) * 2
    dt = OUT.dtype.element_ty
    # (its own loads, each as its half needs it: _dequant_tile's four at once spill on sm_80)
    w_lo = ((b & 15) - 8).to(tl.float32) * tl.load(sz).to(tl.float32)[None, :] \
        + tl.load(sz + 1).to(tl.float32)[None, :]  # fmt: skip
    w_hi = ((b >> 4) - 8).to(tl.float32) * tl.load(sz + 64).to(tl.float32)[None, :] \
        + tl.load(sz + 65).to(tl.float32)[None, :]  # fmt: skip
    out = OUT + k[:, None]
    tl.store(out + n_lo.to(tl.int64)[None, :] * s_on, w_lo.to(dt))
    tl.store(out + (n_lo + 32).to(tl.int64)[None, :] * s_on, w_hi.to(dt))


@triton.jit
def _int6_gemv_kernel(
    X, W, S, P, M, N, K, s_xm, s_wn, s_sn, s_pz, s_pm, CHUNKS,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Groups of 32 inputs: input r of group c is byte (c % 2) * 16 + r % 16 of its 64-input
    block's nibbles (high nibble for r >= 16) and byte 32 + r % 16 of its top bits (bits
    2 (2 (r // 16) + c % 2) on)."""
    pn, part = tl.program_id(0), tl.program_id(1)
    rn = pn * BN + tl.arange(0, BN)
    mn = rn < N
    rm = tl.arange(0, BM)
    mm = rm < M
    r = tl.arange(0, 32)
    half = r // 16
    rows = W + rn.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    c0 = part * CHUNKS
    c1 = tl.minimum(c0 + CHUNKS, K // 32)
    for c in range(c0, c1):
        blk, gi = c // 2, c % 2
        at = rows + blk * 48  # [BN, 1]
        nib = tl.load(at + (gi * 16 + r % 16)[None, :], mask=mn[:, None], other=0).to(tl.int32)
        top = tl.load(at + (32 + r % 16)[None, :], mask=mn[:, None], other=0).to(tl.int32)
        u = ((nib >> (4 * half)[None, :]) & 15) | (((top >> (2 * (2 * half + gi))[None, :]) & 3)
                                                   << 4)  # fmt: skip
        x = tl.load(X + rm[:, None] * s_xm + (c * 32 + r)[None, :], mask=mm[:, None], other=0.0)
        s = tl.load(S + rn * s_sn + c, mask=mn, other=0.0).to(tl.float32)
        acc += _dot(x, tl.trans(u - 32), IEEE, UPCAST) * s[None, :]
    out = P + part * s_pz + rm[:, None] * s_pm + rn[None, :]
    tl.store(out, acc.to(P.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _int8_gemv_kernel(
    X, W, S, P, M, N, K, s_xm, s_wn, s_pz, s_pm, CHUNKS,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pn, part = tl.program_id(0), tl.program_id(1)
    rn = pn * BN + tl.arange(0, BN)
    mn = rn < N
    rm = tl.arange(0, BM)
    mm = rm < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    c0 = part * CHUNKS
    c1 = tl.minimum(c0 + CHUNKS, tl.cdiv(K, BK))
    for c in range(c0, c1):
        k = c * BK + tl.arange(0, BK)
        mk = k < K
        x = tl.load(X + rm[:, None] * s_xm + k[None, :], mask=mm[:, None] & mk[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(W + rn.to(tl.int64)[:, None] * s_wn + k[None, :],
                    mask=mn[:, None] & mk[None, :], other=0)  # fmt: skip
        acc += _dot(x, tl.trans(w), IEEE, UPCAST)
    acc *= tl.load(S + rn, mask=mn, other=0.0).to(tl.float32)[None, :]  # the rows' scales
    out = P + part * s_pz + rm[:, None] * s_pm + rn[None, :]
    tl.store(out, acc.to(P.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _int4_pairs_kernel(
    X, s_xm, XDIV, IDX, W, s_we, SZ, s_se, Y, s_yz, s_ym, N, K, CHUNKS, GROUP: tl.constexpr,
):  # fmt: skip
    """MoE experts in Int4Linear's layout stacked [E, N, K/2] (scales_and_zeros [E, K/g, N, 2]):
    program (pair, block of 64 rows, share of K) multiplies row pair // XDIV of X by expert
    IDX[pair]'s rows (one vector a pair: products summed elementwise into a [GROUP, 32] tile,
    reduced once). No tl.dot, so Triton does not pipeline the loop's loads: the K shares (Y's
    leading axis, partial sums) put more programs, and so more loads, in flight."""
    pair, blk, part = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    e = tl.load(IDX + pair).to(tl.int64)
    xrow = X + (pair // XDIV) * s_xm
    r = tl.arange(0, 32)
    kk = tl.arange(0, GROUP)
    n_lo = blk * 64 + r
    base = W + e * s_we + blk.to(tl.int64) * 32 * K
    szb = SZ + e * s_se
    acc_lo = tl.zeros((GROUP, 32), dtype=tl.float32)
    acc_hi = tl.zeros((GROUP, 32), dtype=tl.float32)
    for c in range(part * CHUNKS, tl.minimum(part * CHUNKS + CHUNKS, K // GROUP)):
        k = c * GROUP + kk
        x = tl.load(xrow + k).to(tl.float32)[:, None]
        b = tl.load(base + k[:, None] * 32 + r[None, :]).to(tl.int32)
        w_lo, w_hi = _dequant_tile(b, szb, c, N, n_lo)
        acc_lo += w_lo * x
        acc_hi += w_hi * x
    out = Y + part * s_yz + pair * s_ym
    dt = Y.dtype.element_ty
    tl.store(out + n_lo, tl.sum(acc_lo, 0).to(dt))
    tl.store(out + n_lo + 32, tl.sum(acc_hi, 0).to(dt))


@triton.jit
def _int8_pairs_kernel(
    X, s_xm, XDIV, IDX, W, s_we, S, s_se, Y, s_ym, N, K, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """As _int4_pairs_kernel for int8 experts [E, N, K] with per-row scales [E, N]: program
    (pair, block of BN rows)."""
    pair, pn = tl.program_id(0).to(tl.int64), tl.program_id(1)
    e = tl.load(IDX + pair).to(tl.int64)
    xrow = X + (pair // XDIV) * s_xm
    rn = pn * BN + tl.arange(0, BN)
    mn = rn < N
    rows = W + e * s_we + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < K
        x = tl.load(xrow + k, mask=mk, other=0.0).to(tl.float32)[None, :]
        w = tl.load(rows + k[None, :], mask=mn[:, None] & mk[None, :], other=0).to(tl.float32)
        acc += w * x
    y = tl.sum(acc, 1) * tl.load(S + e * s_se + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(Y + pair * s_ym + rn, y.to(Y.dtype.element_ty), mask=mn)


@triton.jit
def _int4_gemm_kernel(
    X, s_xm, XIDX, W, s_we, SZ, s_se, Y, s_ym, YIDX, TILES, M, N, K,
    BM: tl.constexpr, GROUP: tl.constexpr, GROUPED: tl.constexpr, GATHER: tl.constexpr,
    SCATTER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (tile of BM rows, block of 64 weight rows): the tile's rows of X (or the rows
    XIDX names: GATHER) against its expert's int4 block (Int4Linear's layout, stacked [E, N,
    K/2] / [E, K/g, N, 2]) as _int4_gemv_kernel multiplies them (the nibbles through the tensor
    cores, scale and zero on the fp32 sums), 32 inputs a step whatever the group (a group of 128
    at once spilled registers from 32 rows on), into Y's rows (or those YIDX names: SCATTER).
    A tile's rows belong to one expert (`tile_rows`); the weight block is read once a tile."""
    blk = tl.program_id(1)
    e, row0, end, rm, mm, xr = _tile_rows(TILES, M, XIDX, BM, GROUPED, GATHER)
    r = tl.arange(0, 32)
    n_lo = blk * 64 + r
    base = W + e * s_we + blk.to(tl.int64) * 32 * K
    szb = SZ + e * s_se
    acc_lo = tl.zeros((BM, 32), dtype=tl.float32)
    acc_hi = tl.zeros((BM, 32), dtype=tl.float32)
    for c in range(0, tl.where(end > row0, K // 32, 0)):  # (no rows: no weight read)
        k = c * 32 + r
        x = tl.load(X + xr[:, None] * s_xm + k[None, :], mask=mm[:, None], other=0.0)
        b = tl.load(base + k[:, None] * 32 + r[None, :]).to(tl.int32)  # [32, 32]
        s_lo, z_lo, s_hi, z_hi = _group_sz(szb, c * 32 // GROUP, N, n_lo)
        xs = tl.sum(x.to(tl.float32), 1)[:, None]
        acc_lo += _dot(x, (b & 15) - 8, IEEE, UPCAST) * s_lo[None, :] + xs * z_lo[None, :]
        acc_hi += _dot(x, (b >> 4) - 8, IEEE, UPCAST) * s_hi[None, :] + xs * z_hi[None, :]
    out = Y + _out_rows(YIDX, rm, mm, SCATTER)[:, None] * s_ym
    dt = Y.dtype.element_ty
    tl.store(out + n_lo[None, :], acc_lo.to(dt), mask=mm[:, None])
    tl.store(out + (n_lo + 32)[None, :], acc_hi.to(dt), mask=mm[:, None])


@triton.jit
def _int8_gemm_kernel(
    X, s_xm, XIDX, W, s_we, S, s_se, Y, s_ym, YIDX, TILES, M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUPED: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """As _int4_gemm_kernel for int8 weights with per-row scales (stacked [E, N, K], [E, N]):
    program (tile, block of BN weight rows)."""
    pn = tl.program_id(1)
    e, row0, end, rm, mm, xr = _tile_rows(TILES, M, XIDX, BM, GROUPED, GATHER)
    rn = pn * BN + tl.arange(0, BN)
    mn = rn < N
    rows = W + e * s_we + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c in range(0, tl.where(end > row0, tl.cdiv(K, BK), 0)):
        k = c * BK + tl.arange(0, BK)
        mk = k < K
        x = tl.load(X + xr[:, None] * s_xm + k[None, :], mask=mm[:, None] & mk[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(rows + k[None, :], mask=mn[:, None] & mk[None, :], other=0)
        acc += _dot(x, tl.trans(w), IEEE, UPCAST)
    acc *= tl.load(S + e * s_se + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + _out_rows(YIDX, rm, mm, SCATTER)[:, None] * s_ym + rn[None, :],
             acc.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])  # fmt: skip


def splits(blocks: int, chunks: int, least: int = 4) -> tuple[int, int]:
    """(programs along K, chunks each) for a matrix of `blocks` row blocks and `chunks` K chunks:
    enough programs to keep the GPU's loads in flight (PROGRAMS), at least `least` chunks
    each."""
    want = max(1, min(-(-PROGRAMS // max(blocks, 1)), chunks // least))
    each = -(-chunks // want)
    return -(-chunks // each), each


def _partials(x: torch.Tensor, n: int, parts: int, rows: int | None = None) -> torch.Tensor:
    """Where the kernels write: y itself (one part), else fp32 partial sums [parts, rows, n]
    (rows: x's unless given), in x's dtype / on its device."""
    rows = x.shape[0] if rows is None else rows
    return torch.empty(parts, rows, n, dtype=x.dtype if parts == 1 else torch.float32,
                       device=x.device)  # fmt: skip


@triton.jit
def _sum_parts_kernel(P, Y, PARTS, NUMEL, BLOCK: tl.constexpr):
    """Y [NUMEL] = the PARTS fp32 partial sums [PARTS, NUMEL] added in order, in Y's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, PARTS):
        acc += tl.load(P + j * NUMEL + i, mask=m, other=0.0)
    tl.store(Y + i, acc.to(Y.dtype.element_ty), mask=m)


SUM_BLOCK = 1024


def _reduce(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The partial sums [parts, M, N] added (one launch: p.sum(0).to(dtype) took two, and a
    decode step has dozens of split matrices)."""
    if p.shape[0] == 1:
        return p[0]
    y = torch.empty(p.shape[1:], dtype=dtype, device=p.device)
    n = y.numel()
    _sum_parts_kernel[(triton.cdiv(n, SUM_BLOCK),)](p, y, p.shape[0], n, BLOCK=SUM_BLOCK)
    return y


def _check(x: torch.Tensor) -> None:
    assert x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(1) == 1, (x.shape, x.stride())


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int,
              n: int) -> torch.Tensor:  # fmt: skip
    """y [M <= 16, n] = x @ W^T, W in quant/layers.py Int4Linear's layout (n % 64 == 0, K % group
    == 0, group 32 / 64 / 128)."""
    _check(x)
    M, K = x.shape
    assert n % ROW_BLOCK == 0 and K % group == 0 and packed.is_contiguous() and sz.is_contiguous()
    parts, each = splits(n // ROW_BLOCK, K // group)
    p = _partials(x, n, parts)
    _int4_gemv_kernel[(n // ROW_BLOCK, parts)](
        x, packed, sz, p, M, n, K, x.stride(0), p.stride(0), p.stride(1), each,
        BM=MAX_ROWS, GROUP=group, IEEE=x.dtype == torch.float32, UPCAST=UPCAST,
    )  # fmt: skip
    return _reduce(p, x.dtype)


def int4_dequant(packed: torch.Tensor, sz: torch.Tensor, group: int, out: torch.Tensor) -> None:
    """out [n, K] (any float dtype, rows strided) = W, as formats.dequantize_int4_groups; or
    stacked experts: packed [E, n, K/2], sz [E, K/g, n, 2], out [E, n, K]."""
    if out.dim() == 2:
        packed, sz, out = packed[None], sz[None], out[None]
    E, n, K = out.shape
    assert out.stride(2) == 1 and packed[0].is_contiguous() and sz[0].is_contiguous()
    _int4_dequant_kernel[(n // ROW_BLOCK, K // group, E)](
        packed, sz, out, n, K, out.stride(1), packed.stride(0), sz.stride(0), out.stride(0),
        GROUP=group,
    )  # fmt: skip


def int6_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M <= 16, N] = x @ W^T, W in Int6Linear's layout (formats.quantize_int6_groups)."""
    _check(x)
    M, K = x.shape
    N = packed.shape[0]
    assert K % 64 == 0 and packed.stride(1) == 1 and scales.stride(1) == 1
    parts, each = splits(triton.cdiv(N, BN), K // 32)
    p = _partials(x, N, parts)
    _int6_gemv_kernel[(triton.cdiv(N, BN), parts)](
        x, packed, scales, p, M, N, K, x.stride(0), packed.stride(0), scales.stride(0),
        p.stride(0), p.stride(1), each, BM=MAX_ROWS, BN=BN, IEEE=x.dtype == torch.float32,
        UPCAST=UPCAST,
    )  # fmt: skip
    return _reduce(p, x.dtype)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bk: int = 128) -> torch.Tensor:
    """y [M <= 16, N] = (x @ q^T) * scale, q [N, K] int8, scale [N] (per row, contiguous)."""
    _check(x)
    M, K = x.shape
    N = q.shape[0]
    assert q.stride(1) == 1
    parts, each = splits(triton.cdiv(N, BN), triton.cdiv(K, bk))
    p = _partials(x, N, parts)
    _int8_gemv_kernel[(triton.cdiv(N, BN), parts)](
        x, q, scale, p, M, N, K, x.stride(0), q.stride(0), p.stride(0), p.stride(1), each,
        BM=MAX_ROWS, BN=BN, BK=bk, IEEE=x.dtype == torch.float32, UPCAST=UPCAST,
    )  # fmt: skip
    return _reduce(p, x.dtype)


def int4_pairs(x: torch.Tensor, per_row: int, idx: torch.Tensor, w: torch.Tensor,
               sz: torch.Tensor, group: int, picks: int) -> torch.Tensor:  # fmt: skip
    """y [P, N]: y[p] = x[p // per_row] @ W[idx[p]]^T for the P = len(idx) (token, expert) pairs
    of a MoE step (per_row: experts a row of x goes to; picks: experts a token picks, top-k);
    w [E, N, K/2], sz [E, K/g, N, 2]. K is shared among programs as one token's pairs would
    need (`splits` of its `picks` pairs): a row's sums do not depend on the batch."""
    P, (_, N, half) = idx.shape[0], w.shape
    K = half * 2
    assert x.stride(1) == 1 and x.shape[1] == K and N % ROW_BLOCK == 0 and K % group == 0
    assert w.is_contiguous() and sz.is_contiguous() and idx.is_contiguous()
    if not P:
        return torch.empty(0, N, dtype=x.dtype, device=x.device)
    parts, each = splits(picks * (N // ROW_BLOCK), K // group, least=2)
    p = _partials(x, N, parts, rows=P)
    _int4_pairs_kernel[(P, N // ROW_BLOCK, parts)](
        x, x.stride(0), per_row, idx, w, w.stride(0), sz, sz.stride(0), p, p.stride(0),
        p.stride(1), N, K, each, GROUP=group,
    )  # fmt: skip
    return _reduce(p, x.dtype)


PAIRS_BN, PAIRS_BK = 16, 128  # the int8 pairs kernel's rows per program and chunk


def expert_pairs(x: torch.Tensor, per_row: int, idx: torch.Tensor, proj,
                 picks: int) -> torch.Tensor:  # fmt: skip
    """y [P, N]: y[p] = x[p // per_row] @ W[idx[p]]^T for a ProjStack `proj` (quant/layers.py:
    int4 or int8 experts; picks: a token's top-k)."""
    if proj.kind == "int4":
        return int4_pairs(x, per_row, idx, proj.weight, proj.scales, proj.group, picks)
    w, s = proj.weight, proj.scales
    P, (_, N, K) = idx.shape[0], w.shape
    assert x.stride(1) == 1 and x.shape[1] == K and w.is_contiguous() and s.is_contiguous()
    y = torch.empty(P, N, dtype=x.dtype, device=x.device)
    if P:
        _int8_pairs_kernel[(P, triton.cdiv(N, PAIRS_BN))](
            x, x.stride(0), per_row, idx, w, w.stride(0), s, s.stride(0), y, y.stride(0), N, K,
            BN=PAIRS_BN, BK=PAIRS_BK,
        )  # fmt: skip
    return y


GEMM_BN, GEMM_BK = 64, 64  # the int8 GEMM's weight rows and inputs a step


def int_gemm(x: torch.Tensor, proj, rows: int, tiles: torch.Tensor | None = None, bm: int = 16,
             xidx: torch.Tensor | None = None, yidx: torch.Tensor | None = None) -> torch.Tensor:
    """y [rows, N] = x @ W^T for one matrix (proj: quant/layers.py ProjStack, E = 1; tiles
    None: x's first `rows` rows) or each row's expert (tiles: `tile_rows` of rows sorted by
    expert). xidx: the x row each (sorted) row reads (else row i reads x[i]); yidx: the y row it
    writes (else y[i])."""
    E, N, K = proj.shape
    y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
    if not rows:
        return y
    assert x.stride(1) == 1 and x.shape[1] == K and proj.weight.is_contiguous()
    assert proj.scales.is_contiguous() and (tiles is not None or E == 1)
    ntiles = tiles.shape[0] if tiles is not None else -(-rows // bm)
    dummy = tiles if tiles is not None else y  # (pointers the flags leave unread)
    common = dict(BM=bm, GROUPED=tiles is not None, GATHER=xidx is not None,
                  SCATTER=yidx is not None, IEEE=x.dtype == torch.float32, UPCAST=UPCAST)
    args = (x, x.stride(0), dummy if xidx is None else xidx, proj.weight, proj.weight.stride(0),
            proj.scales, proj.scales.stride(0), y, y.stride(0), dummy if yidx is None else yidx,
            dummy, rows, N, K)  # fmt: skip
    if proj.kind == "int4":
        assert N % ROW_BLOCK == 0 and K % proj.group == 0 and proj.group % 32 == 0
        _int4_gemm_kernel[(ntiles, N // ROW_BLOCK)](*args, GROUP=proj.group, **common,
                                                    num_warps=gemm_warps(bm))  # fmt: skip
    else:
        _int8_gemm_kernel[(ntiles, triton.cdiv(N, GEMM_BN))](
            *args, BN=GEMM_BN, BK=GEMM_BK, **common, num_warps=gemm_warps(bm))
    return y


# tests/test_triton_compile.py compiles them for sm_90 / sm_80
int4_gemv.kernel, int4_dequant.kernel = _int4_gemv_kernel, _int4_dequant_kernel
int6_gemv.kernel, int8_gemv.kernel = _int6_gemv_kernel, _int8_gemv_kernel
int4_pairs.kernel, expert_pairs.int8_kernel = _int4_pairs_kernel, _int8_pairs_kernel
_reduce.kernel = _sum_parts_kernel
int_gemm.int4_kernel, int_gemm.int8_kernel = _int4_gemm_kernel, _int8_gemm_kernel
