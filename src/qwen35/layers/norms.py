"""Qwen 3.5's two RMSNorms (architecture doc section 1.1).

- `RMSNorm`: zero-centred, y = (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, cast once.
  Used for the residual-stream norms and the attention q_norm / k_norm.
- `GatedRMSNorm`: the DeltaNet output norm, plain weight (not 1 + w), gated by silu(z):
  the normalised value is cast to the model dtype before `* w`, then promoted with the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.layers.linear import empty_param


def rms_norm_zc(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm over the last dim; x: [..., D], weight: [D]."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float):
    """x, z: [..., D]; weight: [D]. Returns weight * norm(x) * silu(z) in x.dtype."""
    dtype = x.dtype
    x32 = x.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * n.to(dtype)  # in the model dtype, as transformers does
    return (y * F.silu(z.float())).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_zc(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)
