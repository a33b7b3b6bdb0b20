"""Packing of same-input projections when some of them are quantized.

`layers.linear.pack_linears` hands groups containing quantized linears here. Consecutive
linears of one format become one matmul on concatenated storage (their parameters become row
views of it, so no memory is added): int8 (weights and per-row scales concatenate), int4 (torch's
CPU layout interleaves rows in blocks of 64 and every int4 weight has out % 64 == 0, so the
packed bytes concatenate too; scales_and_zeros along its row dimension), FP8 when every member
but the last covers whole 128-row blocks (the block grid stays uniform), and plain BF16 members
(e.g. DeltaNet's in_proj_b/a, kept BF16 like the FP8 releases do). A decode step then runs one
matmul per format run instead of one per projection.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.layers.linear import Linear
from qwen35.quant.layers import Fp8Linear, Int4Linear, Int8Linear


class QuantPack:
    """x [T, in] -> one output [T, out_i] per packed linear (column views of each run's output)."""

    def __init__(self, runs: list[tuple[object, list[int]]]):
        self.runs = runs  # (callable x -> [T, sum(sizes)], sizes)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        for fn, sizes in self.runs:
            y = fn(x)
            outs.extend(y.split_with_sizes(sizes, dim=-1) if len(sizes) > 1 else (y,))
        return tuple(outs)


def _kind(lin: Linear) -> tuple:
    if isinstance(lin, Fp8Linear):
        return ("fp8", lin.block)
    if isinstance(lin, Int4Linear):
        return ("int4", lin.group)
    return (type(lin).__name__,)


def _view_rows(lin: Linear, name: str, full: torch.Tensor, row: int, n: int, dim: int = 0):
    p = nn.Parameter(full.narrow(dim, row, n), requires_grad=False)
    p.keep_dtype = True
    setattr(lin, name, p)


def _pack_run(run: list[Linear]):
    """One callable for consecutive linears of one format (without their LoRA adapters, which
    layers/linear.py packed_linear adds to each output)."""
    if len(run) == 1:
        return run[0].matmul
    sizes = [lin.out_features for lin in run]
    total = sum(sizes)
    if type(run[0]) is Linear:
        w = torch.cat([lin.weight.detach() for lin in run])
        row = 0
        for lin in run:
            lin.weight = nn.Parameter(w[row : row + lin.out_features], requires_grad=False)
            row += lin.out_features
        packed = Linear(run[0].in_features, total, device="meta")  # (its matmul: linear(x, w),
        packed.weight = nn.Parameter(w, requires_grad=False)  # which the CPU decode plan resolves)
        return packed.matmul
    if isinstance(run[0], Int8Linear):
        q = torch.cat([lin.weight for lin in run])
        s = torch.cat([lin.weight_scale for lin in run])
        row = 0
        for lin in run:
            _view_rows(lin, "weight", q, row, lin.out_features)
            _view_rows(lin, "weight_scale", s, row, lin.out_features)
            row += lin.out_features
        return Int8Linear(q, s)
    if isinstance(run[0], Int4Linear):
        q = torch.cat([lin.weight for lin in run])
        sz = torch.cat([lin.scales_and_zeros for lin in run], dim=1)
        row = 0
        for lin in run:
            _view_rows(lin, "weight", q, row, lin.out_features)
            _view_rows(lin, "scales_and_zeros", sz, row, lin.out_features, dim=1)
            row += lin.out_features
        return Int4Linear(q, sz, run[0].group, total)
    bo = run[0].block[0]
    if any(lin.out_features % bo for lin in run[:-1]):
        return None  # scale blocks would straddle two projections: no packing
    w = torch.cat([lin.weight for lin in run])
    s = torch.cat([lin.weight_scale_inv for lin in run])
    row = brow = 0
    for lin in run:
        nb = lin.weight_scale_inv.shape[0]
        _view_rows(lin, "weight", w, row, lin.out_features)
        _view_rows(lin, "weight_scale_inv", s, brow, nb)
        row, brow = row + lin.out_features, brow + nb
    packed = Fp8Linear(run[0].in_features, total, run[0].block, device="meta")
    packed.weight, packed.weight_scale_inv = nn.Parameter(w, False), nn.Parameter(s, False)
    return packed


def pack_quantized(linears) -> QuantPack:
    runs: list[list[Linear]] = []
    for lin in linears:
        if runs and _kind(runs[-1][0]) == _kind(lin):
            runs[-1].append(lin)
        else:
            runs.append([lin])
    out = []
    for run in runs:
        fn = _pack_run(run)
        if fn is None:  # unpackable run: one matmul per member (adapters: packed_linear)
            out += [(lin.matmul, [lin.out_features]) for lin in run]
        else:
            out.append((fn, [lin.out_features for lin in run]))
    return QuantPack(out)
