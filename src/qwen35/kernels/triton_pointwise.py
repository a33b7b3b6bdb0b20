"""Two fused pointwise ops in Triton (GPU): one launch, one read and one write each, where the
PyTorch formulations take 4-8 kernels and temporaries.

- `rotary_qk_`: partial NeoX rotary on q [T, nh, hd] and k [T, nkv, hd] together, in place
  (one program per token and head, q's heads first). Only the first rotary_dim dims move.
- `silu_mul`: silu(gate) * up [T, I] from gate, up [T, I] (typically the two halves of one
  packed gate_up output, read in place through their row stride).

Numerics follow the references exactly (layers/rotary.py `apply_rotary`, ops/pointwise.py
`silu_mul_reference`): every product and sum is rounded to the model dtype where PyTorch rounds
it (products of two bf16 values are exact in fp32, so the rounded results match bit for bit);
SiLU runs in fp32 and is rounded once, as torch's bf16 silu does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, NH,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    if h < NH:
        base = Q + t * stride_qt + h * stride_qh
    else:
        base = K + t * stride_kt + (h - NH) * stride_kh
    dt = base.dtype.element_ty
    x1 = tl.load(base + i, mask=m, other=0.0)
    x2 = tl.load(base + HALF + i, mask=m, other=0.0)
    c1 = tl.load(COS + t * stride_ct + i, mask=m, other=0.0)
    c2 = tl.load(COS + t * stride_ct + HALF + i, mask=m, other=0.0)
    s1 = tl.load(SIN + t * stride_ct + i, mask=m, other=0.0)
    s2 = tl.load(SIN + t * stride_ct + HALF + i, mask=m, other=0.0)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each term rounded like torch
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt).to(tl.float32)
    tl.store(base + i, (a1 + b1).to(dt), mask=m)
    tl.store(base + HALF + i, (a2 + b2).to(dt), mask=m)


def rotary_qk_(
    q: torch.Tensor,  # [T, nh, hd], last dim contiguous; rotated in place
    k: torch.Tensor,  # [T, nkv, hd], same dtype
    cos: torch.Tensor,  # [T, rotary_dim] in the model dtype
    sin: torch.Tensor,
) -> None:
    T, nh, _ = q.shape
    nkv = k.shape[1]
    rd = cos.shape[-1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == k.dtype == cos.dtype
    assert cos.is_contiguous() and sin.is_contiguous() and rd % 2 == 0
    if T == 0:
        return
    half = rd // 2
    _rotary_kernel[(T, nh + nkv)](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), nh,
        HALF=half, BLOCK=max(16, triton.next_power_of_2(half)),
    )  # fmt: skip


@triton.jit
def _silu_mul_kernel(G, U, O, stride_g, stride_u, stride_o, N, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    g = tl.load(G + t * stride_g + i, mask=m, other=0.0)
    u = tl.load(U + t * stride_u + i, mask=m, other=0.0)
    dt = g.dtype
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(dt)  # silu in fp32, rounded once
    tl.store(O + t * stride_o + i, (s.to(tl.float32) * u.to(tl.float32)).to(dt), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, N] (rows may be strided) -> silu(gate) * up [T, N], contiguous."""
    T, N = gate.shape
    assert gate.stride(1) == 1 and up.stride(1) == 1 and up.shape == gate.shape
    out = torch.empty(T, N, dtype=gate.dtype, device=gate.device)
    if T:
        block = min(1024, triton.next_power_of_2(N))
        _silu_mul_kernel[(T, triton.cdiv(N, block))](
            gate, up, out, gate.stride(0), up.stride(0), out.stride(0), N, BLOCK=block
        )
    return out
