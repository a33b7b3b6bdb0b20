"""Two fused pointwise ops in Triton (GPU): one launch, one read and one write each, where the
PyTorch formulations take 4-8 kernels and temporaries.

- `rotary_qk_`: partial NeoX rotary on q [T, nh, hd] and k [T, nkv, hd] together, in place
  (one program per token and head, q's heads first). Only the first rotary_dim dims move.
- `silu_mul`: silu(gate) * up [T, I] from gate, up [T, I] (typically the two halves of one
  packed gate_up output, read in place through their row stride).
- `qk_norm_rotary_cache`: the attention layer's inputs of a decode step in one launch: q_norm
  and rotary on the query heads (to a new q), k_norm and rotary on the key heads and the value
  heads copied, both into their cache slots (five launches op by op: two norms, rotary, two
  index_copy_). Same arithmetic as triton_norms' `_rms_zc_kernel` then `_rotary_kernel`.

Numerics follow the references exactly (layers/rotary.py `apply_rotary`, ops/pointwise.py
`silu_mul_reference`): every product and sum is rounded to the model dtype where PyTorch rounds
it (products of two bf16 values are exact in fp32, so the rounded results match bit for bit);
SiLU runs in fp32 and is rounded once, as torch's bf16 silu does. The rotary kernels launch
with `enable_fp_fusion=False` (NO_FMA): left to itself the compiler narrows each rounded fp32
product to a bf16 multiply and contracts it with the sum into one `fma.rn.bf16`, skipping the
product's rounding (seen on an H200: 3% of bf16 elements one ulp off torch; fp32 sums off in
the last bit; tests/test_triton_compile.py checks the PTX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.unavailable import launcher

NO_FMA = {"enable_fp_fusion": False}  # round every product where PyTorch rounds it


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
    x1 = tl.load(base + i, mask=m, other=0.0)
    x2 = tl.load(base + HALF + i, mask=m, other=0.0)
    c1 = tl.load(COS + t * stride_ct + i, mask=m, other=0.0)
    c2 = tl.load(COS + t * stride_ct + HALF + i, mask=m, other=0.0)
    s1 = tl.load(SIN + t * stride_ct + i, mask=m, other=0.0)
    s2 = tl.load(SIN + t * stride_ct + HALF + i, mask=m, other=0.0)
    y1, y2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), c1, c2, s1, s2)
    tl.store(base + i, y1, mask=m)
    tl.store(base + HALF + i, y2, mask=m)


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """The two rotated halves in cos's dtype dt (the model's): x * cos + rotate_half(x) * sin,
    rotate_half(x) = [-x2, x1], each product and the sum rounded to dt like torch (x1, x2: fp32
    holding dt values)."""
    dt = c1.dtype
    a1 = (x1 * c1.to(tl.float32)).to(dt).to(tl.float32)
    b1 = (-x2 * s1.to(tl.float32)).to(dt).to(tl.float32)
    a2 = (x2 * c2.to(tl.float32)).to(dt).to(tl.float32)
    b2 = (x1 * s2.to(tl.float32)).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt)


@launcher("triton_pointwise")
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
        HALF=half, BLOCK=max(16, triton.next_power_of_2(half)), **NO_FMA,
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


@launcher("triton_pointwise")
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


@triton.jit
def _qk_norm_rotary_cache_kernel(
    QG, K, V, QW, KW, COS, SIN, QO, KC, VC, SLOTS, stride_qgt, stride_kt, stride_vt, stride_ct,
    stride_qot, stride_cslot, NH, eps, HD: tl.constexpr, BLOCK_HD: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if h < NH:  # query head h: q is the first half of head h's [q | gate] rows
        src = QG + t * stride_qgt + h * (2 * HD)
        w_ptr = QW
        dst = QO + t * stride_qot + h * HD
    else:  # key head h - NH, written to its cache slot; its value head copied alongside
        kh = h - NH
        slot = tl.load(SLOTS + t).to(tl.int64)
        src = K + t * stride_kt + kh * HD
        w_ptr = KW
        dst = KC + slot * stride_cslot + kh * HD
        j = tl.arange(0, BLOCK_HD)
        v = tl.load(V + t * stride_vt + kh * HD + j, mask=j < HD, other=0.0)
        tl.store(VC + slot * stride_cslot + kh * HD + j, v.to(VC.dtype.element_ty), mask=j < HD)
    dt = QG.dtype.element_ty
    d = tl.arange(0, BLOCK_HD)
    x = tl.load(src + d, mask=d < HD, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HD + eps)
    # the normalised parts, each as the norm kernel rounds it: [0, HALF), [HALF, 2 HALF), rest
    i = tl.arange(0, BLOCK_HALF)
    mi = i < HALF
    x1 = tl.load(src + i, mask=mi, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=mi, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + i, mask=mi, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + i, mask=mi, other=0.0).to(tl.float32)
    y1 = (x1 * rstd * (1.0 + w1)).to(dt).to(tl.float32)
    y2 = (x2 * rstd * (1.0 + w2)).to(dt).to(tl.float32)
    c1 = tl.load(COS + t * stride_ct + i, mask=mi, other=0.0)
    c2 = tl.load(COS + t * stride_ct + HALF + i, mask=mi, other=0.0)
    s1 = tl.load(SIN + t * stride_ct + i, mask=mi, other=0.0)
    s2 = tl.load(SIN + t * stride_ct + HALF + i, mask=mi, other=0.0)
    r1, r2 = _rotate(y1, y2, c1, c2, s1, s2)
    odt = dst.dtype.element_ty
    tl.store(dst + i, r1.to(odt), mask=mi)
    tl.store(dst + HALF + i, r2.to(odt), mask=mi)
    r = 2 * HALF + tl.arange(0, BLOCK_PASS)  # the dims rotary leaves alone
    mr = r < HD
    xr = tl.load(src + r, mask=mr, other=0.0).to(tl.float32)
    wr = tl.load(w_ptr + r, mask=mr, other=0.0).to(tl.float32)
    tl.store(dst + r, (xr * rstd * (1.0 + wr)).to(dt).to(odt), mask=mr)


@launcher("triton_pointwise")
def qk_norm_rotary_cache(
    qg: torch.Tensor,  # [T, nh * 2 hd], per head [query | gate] (rows may be strided)
    k: torch.Tensor,  # [T, nkv * hd] (rows may be strided)
    v: torch.Tensor,  # [T, nkv * hd]
    q_weight: torch.Tensor,  # [hd] q_norm's weight (zero-centred: x * (1 + w))
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,  # [T, rotary_dim] in the model dtype
    sin: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd], written at slot_mapping
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64 flat slots
) -> torch.Tensor:
    """q normed and rotated: [T, nh, hd] in qg's dtype; k (normed, rotated) and v in the caches."""
    T = qg.shape[0]
    nkv, hd = key_cache.shape[2], key_cache.shape[3]
    nh = qg.shape[1] // (2 * hd)
    rd = cos.shape[1]
    assert qg.stride(1) == 1 and k.stride(1) == 1 and v.stride(1) == 1 and rd % 2 == 0
    assert key_cache.is_contiguous() and value_cache.is_contiguous() and cos.is_contiguous()
    assert sin.is_contiguous() and qg.dtype == k.dtype == v.dtype == cos.dtype
    q = torch.empty(T, nh, hd, dtype=qg.dtype, device=qg.device)
    if T:
        half = rd // 2
        _qk_norm_rotary_cache_kernel[(T, nh + nkv)](
            qg, k, v, q_weight, k_weight, cos, sin, q, key_cache, value_cache, slot_mapping,
            qg.stride(0), k.stride(0), v.stride(0), cos.stride(0), q.stride(0), nkv * hd, nh, eps,
            HD=hd, BLOCK_HD=triton.next_power_of_2(hd), HALF=half,
            BLOCK_HALF=max(16, triton.next_power_of_2(half)),
            BLOCK_PASS=max(16, triton.next_power_of_2(max(hd - rd, 1))), **NO_FMA,
        )  # fmt: skip
    return q
