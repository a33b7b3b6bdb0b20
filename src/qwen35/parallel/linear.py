"""Tensor-parallel linear layers: the pieces whose forward needs a collective.

Column-parallel projections need none (each rank's `Linear` simply has fewer output rows); the
row-parallel ones sum their partial products over the ranks (one all-reduce each); the
vocabulary-parallel embedding sums the rows each rank owns; the head gathers each rank's
vocabulary slice once. Expert parallelism: experts.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.layers.linear import Linear, empty_param, linear
from qwen35.parallel.context import TensorParallel


class RowParallelLinear(Linear):
    """weight [out, in / tp]: x [..., in / tp] -> the full y [..., out], summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, dtype, device, tp: TensorParallel):
        super().__init__(in_features, out_features, dtype, device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight))


def row_linear(in_features: int, out_features: int, dtype, device, tp: TensorParallel | None):
    """A row-parallel projection on a local input of `in_features` (a plain Linear at tp=1)."""
    if tp is None or tp.size == 1:
        return Linear(in_features, out_features, dtype, device)
    return RowParallelLinear(in_features, out_features, dtype, device, tp)


class VocabParallelEmbedding(nn.Module):
    """weight [ceil(V/tp), H]: rank r owns token ids [r*Vp, (r+1)*Vp) (padding rows are zero)."""

    def __init__(self, num: int, dim: int, dtype, device, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.rows = tp.vocab_rows(num)
        self.first = tp.rank * self.rows
        self.weight = empty_param(self.rows, dim, dtype=dtype, device=device)  # [Vp, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)  # [T] ids another rank owns
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, H]
        return self.tp.all_reduce(h.masked_fill_(outside[:, None], 0))


class ParallelLMHead(Linear):
    """weight [ceil(V/tp), H] (shared with the embedding when tied): logits of this rank's
    vocabulary slice, gathered once into [S, V] for sampling."""

    def __init__(self, hidden: int, vocab: int, dtype, device, tp: TensorParallel):
        super().__init__(hidden, tp.vocab_rows(vocab), dtype, device)
        self.tp, self.vocab_size = tp, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V]
        return self.tp.gather_last(linear(x, self.weight))[..., : self.vocab_size]
