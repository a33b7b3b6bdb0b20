"""SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype, device)  # [I, H]
        self.up_proj = Linear(hidden_size, intermediate_size, dtype, device)  # [I, H]
        self.down_proj = Linear(intermediate_size, hidden_size, dtype, device)  # [H, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        h = F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x))  # [T, I], in place
        return self.down_proj(h)
