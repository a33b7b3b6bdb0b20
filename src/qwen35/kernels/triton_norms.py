"""Qwen 3.5's two RMSNorms as one Triton kernel each (GPU): one read of x (and z), one write;
and the residual add fused with the zero-centred norm that follows it (`add_rms_norm_zc_`).

The PyTorch formulations (layers/norms.py) take 6-9 kernels per norm; a decode step has ~4 norms
per layer, so inside a CUDA graph they are a large share of the launches. Numerics follow the
references exactly: statistics in fp32, the zero-centred norm cast once, the gated norm rounds
`norm(x)` and `w * norm(x)` to the model dtype before the fp32 gate, as transformers does.
One program per row; rows are the flattened leading dims, D <= 8192.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.unavailable import launcher


@triton.jit
def _rms_zc_kernel(X, W, Y, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    m = d < D
    x = tl.load(X + row * D + d, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + d, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(Y + row * D + d, (x * rstd * (1.0 + w)).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _add_rms_zc_kernel(H, X, W, Y, stride_h, stride_x, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    m = d < D
    h = tl.load(H + row * stride_h + d, mask=m, other=0.0)
    x = tl.load(X + row * stride_x + d, mask=m, other=0.0)
    h = (h.to(tl.float32) + x.to(tl.float32)).to(h.dtype)  # the residual, rounded like h.add_(x)
    tl.store(H + row * stride_h + d, h, mask=m)
    h32 = h.to(tl.float32)
    w = tl.load(W + d, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h32 * h32, 0) / D + eps)
    tl.store(Y + row * D + d, (h32 * rstd * (1.0 + w)).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gated_rms_kernel(X, Z, W, Y, stride_zt, NH, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    m = d < D
    x = tl.load(X + row * D + d, mask=m, other=0.0).to(tl.float32)
    # z row `row` is head row % NH of token row // NH (z may be a column slice of a projection)
    z = tl.load(Z + (row // NH) * stride_zt + (row % NH) * D + d, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + d, mask=m, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    n = (x * rstd).to(w.dtype)  # the normalised value in the model dtype
    y = (n.to(tl.float32) * w.to(tl.float32)).to(w.dtype)  # w * n in the model dtype
    out = y.to(tl.float32) * (z / (1.0 + tl.exp(-z)))  # * silu(z) in fp32
    tl.store(Y + row * D + d, out.to(Y.dtype.element_ty), mask=m)


def _warps(block: int) -> int:
    """Warps per row program: 4 up to 1,024 values, then one per 256 (at most 16), so a thread
    holds at most 16 of the row. With 4 warps a hidden size of 5,120 / 8,192 took 252-255
    registers a thread (8 resident warps per SM); with 16, 64 (ptxas for sm_90, Triton 3.6:
    bench/gpu_kernel_resources.py)."""
    return min(16, max(4, block // 256))


@launcher("triton_norms")
def rms_norm_zc(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (any strides on the leading dims are copied to contiguous) -> same shape."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        B = triton.next_power_of_2(D)
        _rms_zc_kernel[(x2.shape[0],)](
            x2, weight, y, D, eps, BLOCK=B, num_warps=_warps(B), enable_fp_fusion=False
        )  # the q/k norm: rounds as qk_norm_rotary_cache (triton_pointwise.NO_FMA)
    return y.view(x.shape)


@launcher("triton_norms")
def add_rms_norm_zc_(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """h += x in place (the residual stream [T, D], rows may be strided), then the zero-centred
    norm of the new h: [T, D] contiguous, h's dtype."""
    T, D = h.shape
    assert h.stride(1) == 1 and x.stride(1) == 1 and x.shape == h.shape
    y = torch.empty(T, D, dtype=h.dtype, device=h.device)
    if T:
        B = triton.next_power_of_2(D)
        _add_rms_zc_kernel[(T,)](
            h, x, weight, y, h.stride(0), x.stride(0), D, eps, BLOCK=B, num_warps=_warps(B)
        )
    return y


@launcher("triton_norms")
def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float):
    """x, z [..., D]; weight [D] in the model dtype -> weight * norm(x) * silu(z), x's dtype.
    z [T, nh, D] may have any token stride (a column slice of the packed projection: no copy)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    if z.dim() == 3 and z.stride(2) == 1 and z.stride(1) == D:
        z2, stride_zt, nh = z, z.stride(0), z.shape[1]
    else:
        z2 = z.reshape(-1, D).contiguous()
        stride_zt, nh = D, 1
    y = torch.empty_like(x2)
    if x2.shape[0]:
        B = triton.next_power_of_2(D)
        _gated_rms_kernel[(x2.shape[0],)](
            x2, z2, weight, y, stride_zt, nh, D, eps, BLOCK=B, num_warps=_warps(B)
        )
    return y.view(x.shape)
