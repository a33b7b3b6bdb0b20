"""`TensorParallel`: which rank of how many this process is, and the collectives the layers use.

Layers take one (default `SINGLE`: one process, every collective a no-op) and size their weights
from it; the rules match `qwen35.plan.sharding` (the planner's): heads and intermediate sizes are
split, KV heads replicated beyond their count, the vocabulary padded up to a multiple of the size.
With `expert_parallel`, the routed experts are spread whole over the same ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qwen35.cache_spec import kv_heads_per_rank


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: Any = None  # torch.distributed process group of the model's collectives

    @property
    def ep_size(self) -> int:
        return self.size if self.expert_parallel else 1

    # ---- shard arithmetic (sizes must divide; sharding.validate_layout checked it) -----------
    def part(self, n: int) -> int:
        """This rank's share of n evenly split items."""
        return n // self.size

    def start(self, n: int) -> int:
        """First of this rank's items when n items are split evenly."""
        return self.rank * (n // self.size)

    def kv_heads(self, num_kv_heads: int) -> int:
        return kv_heads_per_rank(num_kv_heads, self.size)

    def first_kv_head(self, num_kv_heads: int) -> int:
        """Split: heads [r*nkv/tp, ...); replicated: rank r serves head r // (tp / nkv)."""
        return self.rank * num_kv_heads // self.size

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of the vocabulary-parallel embedding / head per rank (padded up)."""
        return math.ceil(vocab_size / self.size)

    # ---- collectives ------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place: through shared memory where the ranks share a host
        (parallel/shm.py), else gloo / nccl."""
        if self.size > 1:
            import torch.distributed as dist

            from qwen35.parallel import shm

            if self.group is not None or not shm.all_reduce(x):
                dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        from qwen35.parallel import shm

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        if self.group is not None or not shm.all_gather(parts, x):
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()
