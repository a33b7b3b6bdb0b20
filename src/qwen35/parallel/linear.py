"""The collectives around tensor-parallel layers, which stay plain modules.

Column-parallel projections need none (each rank's `Linear` simply has fewer output rows).
Row-parallel ones (o_proj, out_proj, down_proj) are plain `Linear`s over the rank's input
columns; the layer that calls one sums the partial outputs over the ranks (`tp.all_reduce`,
one per projection). The vocabulary-parallel embedding and head are plain modules holding the
rank's rows of the padded vocabulary; `embed` and `gather_logits` add their collectives. Keeping
the weights in plain modules lets quantization (qwen35.quant) swap them for FP8 / int8 / int4
ones on each rank's shard exactly as it does in one process. Expert parallelism: experts.py.
"""

from __future__ import annotations

import torch

from qwen35.parallel.context import TensorParallel


def embed(module, ids: torch.Tensor, tp: TensorParallel) -> torch.Tensor:  # [T] -> [T, H]
    """Look ids up in a vocabulary-parallel embedding: rank r owns token ids [r*Vp, (r+1)*Vp)
    (Vp = tp.vocab_rows; padding rows are zero); the others contribute zeros to the sum."""
    if tp.size == 1:
        return module(ids)
    rows = module.weight.shape[0]  # Vp
    local = ids - tp.rank * rows
    outside = (local < 0) | (local >= rows)  # [T] ids another rank owns
    h = module(local.masked_fill(outside, 0))  # [T, H]
    return tp.all_reduce(h.masked_fill_(outside[:, None], 0))


def gather_logits(logits: torch.Tensor, tp: TensorParallel, vocab_size: int) -> torch.Tensor:
    """This rank's vocabulary slice [S, Vp] -> the full logits [S, V] (one all-gather)."""
    if tp.size == 1:
        return logits
    return tp.gather_last(logits)[..., :vocab_size]
