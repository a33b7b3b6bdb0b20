"""Gated DeltaNet's decode step in two Triton kernels that update the cache slots in place (GPU).

fla-core's `fused_recurrent_gated_delta_rule` (0.6.0) takes and returns whole states, so the
caller gathers every sequence's [nv, dk, dv] fp32 state out of its slot and scatters it back:
three reads and three writes of the largest operand of a decode step instead of one each.
These kernels index the caches by state slot instead (as vLLM's fork of fla does):

- `conv_update_`: per (sequence, channel block): the causal conv over the slot's K-1 previous
  inputs and the new one (fp32 accumulation, rounded once to the model dtype, then SiLU), and
  the slot's conv state shifted by one token, in place. Out: u [N, C].
- `recurrent_step_`: per (sequence, value head, dv block): q and k of its key head l2-normalised
  (eps 1e-6, q times dk^-0.5), S = exp(g) S; delta = beta (v - S^T k); S += k delta^T;
  o = S^T q; S written back into its slot. Out: o [N, nv, dv] (fp32, or the model dtype).
  With `gates` it also computes g and beta from the a / b projections (the seven small ops of
  `deltanet_gates` in its prologue).

References: ops/conv.py `causal_conv1d_update_` and ops/gated_delta.py `gated_delta_step_`
(the gather path of ops/deltanet.py); tests/test_triton_kernels.py compares them, also under
TRITON_INTERPRET=1 on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.unavailable import launcher


@triton.jit
def _conv_update_kernel(
    X, stride_xn, W, stride_wc, CS, stride_cs_slot, stride_cs_c, SLOTS, U, stride_un, C,
    K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = c < C
    slot = tl.load(SLOTS + n).to(tl.int64)
    base = CS + slot * stride_cs_slot + c * stride_cs_c
    x = tl.load(X + n * stride_xn + c, mask=m, other=0.0)
    xs = x.to(CS.dtype.element_ty)  # the new input as the state stores it
    acc = xs.to(tl.float32) * tl.load(W + c * stride_wc + (K - 1), mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):
        sj = tl.load(base + j, mask=m, other=0.0).to(tl.float32)
        acc += sj * tl.load(W + c * stride_wc + j, mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 2):  # shift left by one token (reads j+1 before it is written)
        tl.store(base + j, tl.load(base + j + 1, mask=m, other=0.0), mask=m)
    tl.store(base + (K - 2), xs, mask=m)
    y = acc.to(X.dtype.element_ty).to(tl.float32)  # rounded once to the model dtype
    tl.store(U + n * stride_un + c, (y / (1.0 + tl.exp(-y))).to(U.dtype.element_ty), mask=m)


@launcher("triton_deltanet")
def conv_update_(
    x: torch.Tensor,  # [N, C] new pre-conv inputs (rows may be strided)
    weight: torch.Tensor,  # [C, K] (row-strided view is fine)
    conv_cache: torch.Tensor,  # [slots, C, K-1], updated in place at state_slots
    state_slots: torch.Tensor,  # [N] int64
) -> torch.Tensor:
    """silu(conv) [N, C] in x's dtype."""
    N, C = x.shape
    K = weight.shape[1]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and conv_cache.stride(2) == 1
    u = torch.empty(N, C, dtype=x.dtype, device=x.device)
    block = 256
    _conv_update_kernel[(N, triton.cdiv(C, block))](
        x, x.stride(0), weight, weight.stride(0), conv_cache, conv_cache.stride(0),
        conv_cache.stride(1), state_slots, u, u.stride(0), C, K=K, BLOCK_C=block,
    )  # fmt: skip
    return u


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulps for u >= 0 (log(w) * u / (w - 1), w = 1 + u rounded)."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _recurrent_kernel(
    U, stride_un, G, stride_gn, B, stride_bn, DT, ALOG, S, stride_s_slot, SLOTS, O, stride_on,
    scale, R: tl.constexpr, KD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, RAW_GATES: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // R  # value head hv reads key head hv // (nv / nk)
    dk = tl.arange(0, DK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    mv = dv < DV
    slot = tl.load(SLOTS + n).to(tl.int64)
    row = U + n * stride_un
    q = tl.load(row + h * DK + dk).to(tl.float32)
    k = tl.load(row + KD + h * DK + dk).to(tl.float32)
    v = tl.load(row + 2 * KD + hv * DV + dv, mask=mv, other=0.0).to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = k / tl.sqrt(tl.sum(k * k, 0) + 1e-6)
    gv = tl.load(G + n * stride_gn + hv)
    bv = tl.load(B + n * stride_bn + hv)
    if RAW_GATES:  # G, B hold the a, b projections: the gates of ops/deltanet.py here
        x = gv.to(tl.float32) + tl.load(DT + hv).to(tl.float32)
        sp = tl.where(x > 20.0, x, _log1p(tl.exp(x)))  # softplus (torch's threshold 20)
        a = tl.exp(sp * -tl.exp(tl.load(ALOG + hv).to(tl.float32)))
        beta = (1.0 / (1.0 + tl.exp(-bv.to(tl.float32)))).to(bv.dtype).to(tl.float32)
    else:  # G: the fp32 log-decay, B: beta
        a = tl.exp(gv.to(tl.float32))
        beta = bv.to(tl.float32)
    sp = S + slot * stride_s_slot + hv * DK * DV + dk[:, None] * DV + dv[None, :]
    # (bf16 states, --mamba-ssm-cache-dtype bf16: widened, stepped in fp32, stored rounded)
    s = tl.load(sp, mask=mv[None, :], other=0.0).to(tl.float32) * a  # [DK, BV] decayed
    delta = (v - tl.sum(s * k[:, None], 0)) * beta  # [BV]
    s = s + k[:, None] * delta[None, :]
    tl.store(sp, s.to(S.dtype.element_ty), mask=mv[None, :])
    out = tl.sum(s * q[:, None], 0)
    tl.store(O + n * stride_on + hv * DV + dv, out.to(O.dtype.element_ty), mask=mv)


@launcher("triton_deltanet")
def recurrent_step_(
    u: torch.Tensor,  # [N, C] conv outputs, channels [q | k | v]
    g: torch.Tensor,  # [N, nv] fp32 log-decay, or the a projection when gates is given
    beta: torch.Tensor,  # [N, nv], or the b projection when gates is given
    rec_cache: torch.Tensor,  # [slots, nv, dk, dv] fp32 / bf16, updated in place at state_slots
    state_slots: torch.Tensor,  # [N] int64
    num_key_heads: int,
    gates: tuple[torch.Tensor, torch.Tensor] | None = None,  # (dt_bias, A_log) [nv] each
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """o [N, nv, dv] in out_dtype (rounded once from fp32). With `gates`, g and beta are the raw
    a and b projections (rows may be strided) and the kernel computes what ops/deltanet.py
    `deltanet_gates` does: g = softplus(a + dt_bias) * -exp(A_log) in fp32, beta = sigmoid(b)
    rounded to b's dtype (one launch instead of seven: a decode step is launch-bound)."""
    N = u.shape[0]
    _, nv, dk, dv = rec_cache.shape
    assert rec_cache.dtype in (torch.float32, torch.bfloat16) and rec_cache[0].is_contiguous()
    assert g.stride(-1) == 1 and beta.stride(-1) == 1
    o = torch.empty(N, nv, dv, dtype=out_dtype, device=u.device)
    dt, alog = gates if gates is not None else (g, g)  # (unread without RAW_GATES)
    bv = min(32, triton.next_power_of_2(dv))
    _recurrent_kernel[(N, nv, triton.cdiv(dv, bv))](
        u, u.stride(0), g, g.stride(0), beta, beta.stride(0), dt, alog, rec_cache,
        rec_cache.stride(0), state_slots, o, o.stride(0), dk**-0.5,
        R=nv // num_key_heads, KD=num_key_heads * dk, DK=dk, DV=dv, BV=bv,
        RAW_GATES=gates is not None,
    )  # fmt: skip
    return o
