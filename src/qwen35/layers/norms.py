"""Qwen 3.5's two RMSNorms (architecture doc section 1.1).

- `RMSNorm`: zero-centred, y = (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, cast once.
  Used for the residual-stream norms and the attention q_norm / k_norm.
- `GatedRMSNorm`: the DeltaNet output norm, plain weight (not 1 + w), gated by silu(z):
  the normalised value is cast to the model dtype before `* w`, then promoted with the gate.
Given a backend with `triton_norms` (GPU), each is one Triton kernel (kernels/triton_norms.py),
and `RMSNorm.add_forward` (the residual add, then the norm) is one kernel too; on a CPU backend
with `cpu_small_ops` each is one C++ call (kernels/small_ops.py). These PyTorch functions are
their reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.kernels import small_ops
from qwen35.layers.linear import empty_param
from qwen35.ops.backend import Backend


def _inv_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim: [..., 1] fp32, without an x^2 temporary."""
    ms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x32.shape[-1])
    return ms.add_(eps).rsqrt_()


def rms_norm_zc(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm over the last dim; x: [..., D], weight: [D]."""
    x32 = x.float()
    y = x32 * _inv_rms(x32, eps)  # fresh fp32 tensor: the rest runs in place
    return y.mul_(1.0 + weight.float()).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float):
    """x, z: [..., D]; weight: [D]. Returns weight * norm(x) * silu(z) in x.dtype."""
    dtype = x.dtype
    x32 = x.float()
    y = (x32 * _inv_rms(x32, eps)).to(dtype).mul_(weight)  # w * n in the model dtype, as HF
    gate = F.silu(z.float())  # fp32
    if dtype == torch.float32:
        return y.mul_(gate)
    return gate.mul_(y).to(dtype)


def _triton(backend: Backend | None, x: torch.Tensor) -> bool:
    return backend is not None and backend.triton_norms and backend.on_gpu_path(x) and x.shape[-1] <= 8192


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        if _triton(backend, x):
            from qwen35.kernels import triton_norms

            return triton_norms.rms_norm_zc(x, self.weight, self.eps)
        cpu = small_ops.for_backend(backend, x)
        if cpu is not None and x.dim() in (2, 3) and x.stride(-1) == 1:
            return cpu.rms_norm_zc(x, self.weight, self.eps)
        return rms_norm_zc(x, self.weight, self.eps)

    def add_forward(
        self, h: torch.Tensor, delta: torch.Tensor | None, backend: Backend | None = None
    ) -> torch.Tensor:
        """h += delta in place (h [T, D], the residual stream; delta None: nothing to add),
        then the norm of h."""
        if delta is None:
            return self.forward(h, backend)
        if _triton(backend, h) and h.dim() == 2 and h.stride(-1) == 1 and delta.stride(-1) == 1:
            from qwen35.kernels import triton_norms

            return triton_norms.add_rms_norm_zc_(h, delta, self.weight, self.eps)
        cpu = small_ops.for_backend(backend, h)
        if cpu is not None and h.dim() == 2 and h.is_contiguous() and delta.stride(-1) == 1:
            return cpu.add_rms_norm_zc_(h, delta, self.weight, self.eps)
        return rms_norm_zc(h.add_(delta), self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, z: torch.Tensor, backend: Backend | None = None):
        if _triton(backend, x):
            from qwen35.kernels import triton_norms

            return triton_norms.gated_rms_norm(x, z, self.weight, self.eps)
        cpu = small_ops.for_backend(backend, x)
        if cpu is not None and x.dim() in (2, 3) and x.stride(-1) == 1 and z.stride(-1) == 1:
            return cpu.gated_rms_norm(x, z, self.weight, self.eps)
        return gated_rms_norm(x, z, self.weight, self.eps)
