"""SiLU * mul (SwiGLU's activation) with its dispatch: the fused Triton kernel on the GPU
backend (kernels/triton_pointwise.py), the C++ one on a CPU backend with `cpu_small_ops`
(kernels/small_ops.py), this PyTorch reference elsewhere.

Shapes: gate, up [T, N] (often the two column halves of one packed gate_up output) -> [T, N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.kernels import small_ops
from qwen35.ops.backend import Backend


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False):
    """silu(gate) * up in gate's dtype (silu rounded once, then the product); inplace: written
    into gate (a temporary of the caller's)."""
    return F.silu(gate, inplace=inplace).mul_(up)


def silu_mul(be: Backend | None, gate: torch.Tensor, up: torch.Tensor, inplace: bool = False):
    """[T, N]; `inplace` lets the reference path overwrite gate (the kernel writes a new one)."""
    if (
        be is not None
        and be.triton_pointwise
        and be.on_gpu_path(gate)
        and gate.dim() == 2
        and gate.stride(-1) == 1
        and up.stride(-1) == 1
    ):
        from qwen35.kernels import triton_pointwise

        return triton_pointwise.silu_mul(gate, up)
    cpu = small_ops.for_backend(be, gate)
    if cpu is not None and gate.dim() == 2 and gate.stride(-1) == 1 and up.stride(-1) == 1:
        return cpu.silu_mul(gate, up)  # a fresh contiguous [T, N]
    return silu_mul_reference(gate, up, inplace)
