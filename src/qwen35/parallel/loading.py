"""A tensor-parallel rank's weights: built at its shard sizes, filled with only its slices.

The checkpoint is scanned against the full (unsharded) model built on the meta device, so the
coverage check and its errors are the single-process ones; the rank's own model is then
allocated at its shard sizes and each tensor is copied through `shard.copies` from the
memory-mapped file's `get_slice`: a rank never reads (or allocates) a whole split tensor.
An FP8 weight's block scales are split with it, whole blocks each (shard.scale_rule).
"""

from __future__ import annotations

import torch

from qwen35.config import ModelConfig
from qwen35.parallel.context import TensorParallel
from qwen35.parallel.shard import copies, scale_rule, shard_rule, weight_of_scale
from qwen35.weights import check_finite

_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _region(target, full: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """The part of the full parameter a checkpoint tensor covers (see weights._dest)."""
    whole = [(0, n, True) for n in full]
    if target.expert is None:
        return whole
    e = target.expert
    if target.part == "down":
        return [(e, e + 1, False), *whole[1:]]
    half = full[1] // 2
    lo = 0 if target.part == "gate" else half
    return [(e, e + 1, False), (lo, lo + half, True), whole[2]]


class ShardReader:
    """`weights.read_into`'s shard hook for one rank."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, full_shapes: dict[str, tuple]):
        self.cfg, self.tp, self.full_shapes = cfg, tp, full_shapes
        q = cfg.quantization
        self.block = tuple(q.weight_block_size) if q is not None else (128, 128)
        self.checked = True  # every slice copied was counted for NaN / inf (LoadReport)

    def rule(self, name: str):
        """This rank's rule for parameter `name` (an FP8 scale follows its weight's rule)."""
        tp = self.tp
        weight = weight_of_scale(name)
        if weight is None:
            return shard_rule(name, self.full_shapes[name], self.cfg, tp.rank, tp.size,
                              tp.expert_parallel)  # fmt: skip
        w = shard_rule(weight, self.full_shapes[weight], self.cfg, tp.rank, tp.size,
                       tp.expert_parallel)  # fmt: skip
        return scale_rule(w, len(self.full_shapes[weight]), self.block, name)

    def __call__(self, entry, sl, param: torch.Tensor, file: str) -> int:
        name = entry.target.param
        full = self.full_shapes[name]
        rule = self.rule(name)
        nbytes = 0
        for src_idx, dst_idx in copies(rule, _region(entry.target, full)):
            src = sl[src_idx] if src_idx else sl[:]
            dst = param[dst_idx]
            dst.copy_(src)  # casts (the fp32 A_log / norms) on the way
            self.checked &= check_finite(entry.key, dst, file, src)
            nbytes += src.numel() * src.element_size()
        return nbytes


def zero_vocab_padding(params: dict[str, torch.Tensor], cfg: ModelConfig, tp: TensorParallel):
    """Rows past the vocabulary on the last rank(s): zero, so they never hold garbage."""
    rows = tp.vocab_rows(cfg.vocab_size)
    real = max(0, min(rows, cfg.vocab_size - tp.rank * rows))
    with torch.no_grad():
        for name in _VOCAB:
            if name in params and real < rows:
                params[name][real:].zero_()
