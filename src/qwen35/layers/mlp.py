"""SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

from __future__ import annotations

import torch
from torch import nn

from qwen35.layers.linear import Linear, pack_linears, packed_linear
from qwen35.ops.backend import Backend
from qwen35.ops.pointwise import silu_mul
from qwen35.parallel.context import SINGLE, TensorParallel


class MLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype=None,
        device=None,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ):
        """Under tensor parallelism each rank holds intermediate_size / tp; down_proj sums the
        ranks' partial outputs unless `reduce` is False (the caller sums, e.g. the MoE block)."""
        super().__init__()
        intermediate_size = tp.part(intermediate_size)
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype, device)  # [I, H]
        self.up_proj = Linear(hidden_size, intermediate_size, dtype, device)  # [I, H]
        self.down_proj = Linear(intermediate_size, hidden_size, dtype, device)  # [H, I]
        self.tp = tp if reduce else SINGLE  # down_proj is row-parallel: sum its outputs
        self.packed_gate_up: torch.Tensor | None = None  # [2I, H], see pack()
        # a MoE block's shared expert: the block packed gate_proj and up_proj with its router
        # (layers/moe.py SparseMoE.pack, which runs first) and set packed_gate_up to their rows
        self.packed_by_parent = False

    def pack_groups(self) -> list[tuple[tuple[Linear, ...], int]]:
        """The linears pack() packs (and rows_multiple): the loader allocates them as one (a
        shared expert's are its MoE block's group, which the loader meets first)."""
        return [((self.gate_proj, self.up_proj), 1)]

    def pack(self) -> None:
        """One [2I, H] weight for gate_proj and up_proj (after loading)."""
        if not self.packed_by_parent:
            self.packed_gate_up = pack_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """[T, H] -> [T, H]."""
        gate, up = packed_linear(x, self.packed_gate_up, self.gate_proj, self.up_proj)
        h = silu_mul(backend, gate, up, inplace=True)  # [T, I]; gate is a temporary either way
        return self.tp.all_reduce(self.down_proj(h))  # [T, H]
