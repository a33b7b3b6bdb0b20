"""Rows sorted by expert cut into tiles for the grouped GEMMs of quantized experts on the GPU
(kernels/triton_int.py `int_gemm`: int4 / int8; kernels/triton_fp8.py `fp8_grouped_gemm`), and
the tile sizes and warps they launch with.

A MoE step's (token, choice) pairs, sorted by expert (ops/moe.py `tiled_experts`), give each
expert a contiguous run of rows; `tile_rows` cuts every run into tiles of BM rows on the device
(no host sync: a decode step stays capturable), and program t of a grouped GEMM reads tile t's
expert, first row and end (`_tile_rows`; a dense matrix: rows t * BM on). A tile never mixes
experts, so its program reads one expert's weight block once for all its rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_rows(TILES, M, XIDX, BM: tl.constexpr, GROUPED: tl.constexpr, GATHER: tl.constexpr):
    """Program t's tile: (expert, its first row, the end of the expert's rows, the tile's rows
    rm, their mask, the x row each reads: XIDX[rm] (GATHER) or rm). Grouped: TILES [t, 3]
    (`tile_rows`; expert -1: no tile, end 0); else rows t * BM on of one matrix (M rows)."""
    t = tl.program_id(0)
    if GROUPED:
        e = tl.load(TILES + 3 * t)
        row0 = tl.load(TILES + 3 * t + 1)
        end = tl.load(TILES + 3 * t + 2)
    else:
        e = t * 0
        row0 = t * BM
        end = M
    rm = row0 + tl.arange(0, BM)
    mm = rm < end
    xr = tl.load(XIDX + rm, mask=mm, other=0).to(tl.int64) if GATHER else rm.to(tl.int64)
    return tl.maximum(e, 0).to(tl.int64), row0, end, rm, mm, xr


@triton.jit
def _out_rows(YIDX, rm, mm, SCATTER: tl.constexpr):
    """The y row each of the tile's rows is written to: YIDX[rm] (SCATTER) or rm."""
    return tl.load(YIDX + rm, mask=mm, other=0).to(tl.int64) if SCATTER else rm.to(tl.int64)


def tile_rows(counts: torch.Tensor, bm: int, rows: int) -> torch.Tensor:
    """[tiles, 3] int32 (expert, first row, end of its rows) for a grouped GEMM over `rows` rows
    sorted by expert, counts[e] of expert e: each expert's rows in tiles of bm, on the device
    without a host sync (capturable). Sized for any counts summing to `rows` (cdiv(rows, bm) +
    min(E, rows) tiles): the unused ones have expert -1 and no rows."""
    E = counts.shape[0]
    counts = counts.to(torch.int32)
    ends = counts.cumsum(0, dtype=torch.int32)
    per = (counts + (bm - 1)) // bm
    tend = per.cumsum(0, dtype=torch.int32)
    t = torch.arange(-(-rows // bm) + min(E, rows), device=counts.device, dtype=torch.int32)
    e = torch.searchsorted(tend, t, right=True)  # the tile's expert (E: none)
    ec = e.clamp(max=E - 1)
    row0 = ends[ec] - counts[ec] + (t - (tend[ec] - per[ec])) * bm
    none = e >= E
    return torch.stack([torch.where(none, -1, ec.to(torch.int32)), row0,
                        torch.where(none, 0, ends[ec])], 1).to(torch.int32).contiguous()  # fmt: skip


def gemm_bm(rows_per_expert: float) -> int:
    """A tile's rows: 16 (the GEMVs' mma shape) up to 64 as the rows an expert (or a matrix)
    gets grow: fewer padded rows for sparse experts, fuller tensor-core tiles for dense ones.
    By shape only (a step's row count), never by the values. UNMEASURED: an estimate."""
    return 16 if rows_per_expert < 32 else 32 if rows_per_expert < 64 else 64


def gemm_warps(bm: int) -> int:
    """The GEMMs' warps: 8 from 32 rows a tile on (4 spilled registers there on sm_90:
    tests/test_triton_compile.py)."""
    return 4 if bm <= 16 else 8
