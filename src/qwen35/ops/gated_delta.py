"""The gated delta rule (Gated DeltaNet's recurrence), three ways:

- `naive_gated_delta_rule`: one token at a time, the plain definition; the test oracle only.
- `chunk_gated_delta_rule`: chunks of 64 tokens for prefill; the intra-chunk work (UT transform,
  intra-chunk attention) is batched over all chunks and heads, only the state hand-off between
  chunks runs in a Python loop (T/64 steps).
- `recurrent_gated_delta_step`: one token for each of N sequences, state updated in place, on
  raw inputs (FLA's recurrent interface). Decode itself runs `gated_delta_step_` on inputs that
  `l2norm_qk` prepared (the PyTorch path of layers/deltanet.py), or the fused CPU kernel
  (kernels/), whose reference these two are.

Common arguments (FLA's conventions): q, k [.., Hk, dk] and v [.., Hv, dv] in any float dtype;
value head h reads key head h // (Hv / Hk). With `use_qk_l2norm`, q and k are l2-normalised
(eps 1e-6) in fp32; q is always scaled by `scale` (default dk^-0.5). `g` is the log-decay (<= 0)
and `beta` in (0, 1), per value head. Everything runs in fp32; the state S of one head is
[dk, dv]:  S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S^T k_t))^T (decay first),  o_t = S_t^T q_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_SIZE = 64
F32 = torch.float32


L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (FLA's and transformers' convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, num_v_heads: int, use_qk_l2norm: bool, scale: float | None, dim: int):
    """fp32 q (normalised if asked, times scale, default dk^-0.5) and k (normalised if asked),
    heads repeated to num_v_heads along `dim`."""
    q, k = q.to(F32), k.to(F32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (scale if scale is not None else q.shape[-1] ** -0.5)
    r = num_v_heads // k.shape[dim]
    if r > 1:
        q, k = q.repeat_interleave(r, dim=dim), k.repeat_interleave(r, dim=dim)
    return q, k


def naive_gated_delta_rule(
    q: torch.Tensor,  # [B, T, Hk, dk]
    k: torch.Tensor,  # [B, T, Hk, dk]
    v: torch.Tensor,  # [B, T, Hv, dv]
    g: torch.Tensor,  # [B, T, Hv]
    beta: torch.Tensor,  # [B, T, Hv]
    initial_state: torch.Tensor | None = None,  # [B, Hv, dk, dv]
    *,
    use_qk_l2norm: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reference. Returns o [B, T, Hv, dv] and the final state [B, Hv, dk, dv]."""
    B, T, H, dv = v.shape
    q, k = _prepare(q, k, H, use_qk_l2norm, scale, dim=2)
    v, g, beta = v.to(F32), g.to(F32), beta.to(F32)
    dk = k.shape[-1]
    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(F32).clone()
    o = q.new_empty(B, T, H, dv)
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kv = (S * k[:, t, :, :, None]).sum(-2)  # S^T k: [B, H, dv]
        delta = (v[:, t] - kv) * beta[:, t, :, None]  # [B, H, dv]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]  # outer product [B, H, dk, dv]
        o[:, t] = (S * q[:, t, :, :, None]).sum(-2)
    return o, S


def _exp_cut(x: torch.Tensor) -> torch.Tensor:
    """exp(x), exactly 0 below exp(-60) ~ 1e-26. Strong decays otherwise fill the chunk
    matrices with fp32 denormals, whose CPU slow path makes the GEMMs several times slower; terms
    that small are far below fp32 resolution next to the O(1) recent-token terms."""
    return x.masked_fill(x < -60.0, -torch.inf).exp_()


def _diag_blocks(m: torch.Tensor, size: int) -> torch.Tensor:
    """The diagonal size x size blocks of m [..., C, C] as a view: [..., C // size, size, size]."""
    nb = m.shape[-1] // size
    m = m.view(*m.shape[:-2], nb, size, nb, size)
    return torch.diagonal(m, 0, -4, -2).movedim(-1, -3)


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + strictly_lower(a))^-1 for a: [..., C, C] (the diagonal of a is ignored).
    Recursive 2x2 block inversion, [[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]],
    from 1x1 blocks up: log2(C) levels of batched matmuls instead of a LAPACK triangular
    solve per matrix; as accurate as forward substitution in our tests."""
    C = a.shape[-1]
    if C & (C - 1):  # not a power of two (a short odd-length sequence): plain solve
        eye = torch.eye(C, dtype=a.dtype, device=a.device).expand_as(a)
        return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
    low = a.tril(-1)
    inv = torch.eye(C, dtype=a.dtype, device=a.device).expand_as(a).clone()
    s = 1
    while s < C:
        ib, lb = _diag_blocks(inv, 2 * s), _diag_blocks(low, 2 * s)  # [..., C/2s, 2s, 2s]
        ib[..., s:, :s] = -(ib[..., s:, s:] @ lb[..., s:, :s] @ ib[..., :s, :s])
        s *= 2
    return inv


def _to_chunks(x: torch.Tensor, N: int, C: int, heads: int, scale=None) -> torch.Tensor:
    """[B, T, h, d] -> fp32 [N, B*heads, C, d] (chunk-major, zero-padded, heads repeated to
    `heads`, optionally times scale [B, T, h, 1]) in one strided copy per part."""
    B, T, h, d = x.shape
    r = heads // h
    out = torch.empty(N, B, h, r, C, d, dtype=F32, device=x.device)
    full, tail = T // C, T % C

    def put(dst, a, b):  # dst [n, B, h, r, c, d] <- tokens a:b
        n, c = dst.shape[0], dst.shape[4]
        src = x[:, a:b].reshape(B, n, c, h, 1, d).permute(1, 0, 3, 4, 2, 5)  # [n, B, h, 1, c, d]
        if scale is None:
            dst.copy_(src.expand_as(dst))
        else:
            sc = scale[:, a:b].reshape(B, n, c, h, 1, 1).permute(1, 0, 3, 4, 2, 5)
            torch.mul(src.expand_as(dst), sc, out=dst)  # mul's out= does not broadcast

    if full:
        put(out[:full], 0, full * C)
    if tail:
        put(out[full:, :, :, :, :tail], full * C, T)
        out[full:, :, :, :, tail:] = 0  # padding: g = 0, beta = 0 steps leave S unchanged
    return out.view(N, B * heads, C, d)


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [B, T, Hk, dk]
    k: torch.Tensor,  # [B, T, Hk, dk]
    v: torch.Tensor,  # [B, T, Hv, dv]
    g: torch.Tensor,  # [B, T, Hv]
    beta: torch.Tensor,  # [B, T, Hv]
    initial_state: torch.Tensor | None = None,  # [B, Hv, dk, dv]
    *,
    use_qk_l2norm: bool = False,
    scale: float | None = None,
    chunk_size: int = CHUNK_SIZE,
    out: torch.Tensor | None = None,  # [B, T, Hv, dv], any dtype: written in place
    states_at: Sequence[tuple[int, torch.Tensor]] = (),  # (t, dest [B, Hv, dk, dv])
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form (UT transform). Returns o [B, T, Hv, dv] (fp32, or `out`) and the final
    state [B, Hv, dk, dv] fp32. A sequence shorter than `chunk_size` is one chunk of its own
    length; longer ones are zero-padded to a multiple of it. Work is laid out chunk-major,
    [N chunks, B*Hv, C, d], so each chunk's slice is contiguous for the sequential loop.
    `states_at`: the state after the first t tokens is copied into dest, for t a multiple of
    the chunk size (the hand-off between chunks computes it anyway; prefix-cache checkpoints)."""
    B, T, H, dv = v.shape
    dk = k.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    for t, _ in states_at:
        if t % C or not 0 < t <= T:
            raise ValueError(
                f"states_at offset {t} is not a multiple of the chunk size {C} in 1..{T}"
            )
    scale = dk**-0.5 if scale is None else scale
    if use_qk_l2norm:  # l2norm's 1/|x| factors, folded into the layout copy
        qs = torch.linalg.vector_norm(q, dim=-1, keepdim=True, dtype=F32).square_() + L2NORM_EPS
        qs = qs.rsqrt_().mul_(scale)  # [B, T, Hk, 1]
        ks = torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=F32).square_() + L2NORM_EPS
        ks = ks.rsqrt_()
    else:
        qs, ks = torch.full_like(q[..., :1], scale, dtype=F32), None
    q, k = _to_chunks(q, N, C, H, qs), _to_chunks(k, N, C, H, ks)  # [N, BH, C, dk]
    v = _to_chunks(v, N, C, H)  # [N, BH, C, dv]
    beta = _to_chunks(beta[..., None], N, C, H)  # [N, BH, C, 1]
    gam = _to_chunks(g[..., None], N, C, H)[..., 0].cumsum(-1)  # cumulative log-decay [N, BH, C]

    # decay[i, j] = exp(gam_i - gam_j) for j <= i, else 0: [N, BH, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = _exp_cut((gam[..., :, None] - gam[..., None, :]).masked_fill_(~causal, -torch.inf))
    k_beta = k * beta  # [N, BH, C, dk]
    # T = I + A, A = strictly_lower((beta k) k^T * decay); U = T^-1 (beta v) and
    # W = T^-1 (beta exp(gam) k) as GEMMs.
    t_inv = unit_lower_inverse((k_beta @ k.transpose(-1, -2)).mul_(decay))  # [N, BH, C, C]
    egam = _exp_cut(gam)[..., None]  # [N, BH, C, 1]
    u = t_inv @ v.mul_(beta)  # [N, BH, C, dv]
    w = t_inv @ k_beta.mul_(egam)  # [N, BH, C, dk]

    g_last = gam[..., -1:]  # [N, BH, 1]
    k_dec = k * _exp_cut(g_last - gam)[..., None]  # keys decayed to the chunk end: [N, BH, C, dk]
    chunk_decay = _exp_cut(g_last)[..., None]  # [N, BH, 1, 1]

    # Sequential hand-off of S between chunks: V' = U - W S, S = exp(gam_last) S + K_dec^T V'.
    BH = B * H
    states = q.new_empty(N + 1, BH, dk, dv)  # states[n]: S entering chunk n; states[N]: final
    if initial_state is None:
        states[0].zero_()
    else:
        states[0].copy_(initial_state.reshape(BH, dk, dv))
    v_new = u  # V' overwrites U chunk by chunk
    for n in range(N):  # written in place: no per-chunk allocations
        v_new[n].baddbmm_(w[n], states[n], alpha=-1.0)  # [BH, C, dv]
        torch.mul(states[n], chunk_decay[n], out=states[n + 1])
        states[n + 1].baddbmm_(k_dec[n].transpose(-1, -2), v_new[n])
    S = states[N]
    for t, dest in states_at:
        dest.copy_(states[t // C].view(B, H, dk, dv))

    # All chunks at once: O = ((Q K^T) * decay) V' + (Q exp(gam)) S_in
    attn = (q @ k.transpose(-1, -2)).mul_(decay)  # intra-chunk: [N, BH, C, C]
    o = q.mul_(egam) @ states[:N]  # [N, BH, C, dv]
    o.add_(attn @ v_new)
    o = o.view(N, B, H, C, dv).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, dv)[:, :T]
    if out is not None:
        out.copy_(o)
        o = out
    return o, S.reshape(B, H, dk, dv)


def recurrent_gated_delta_step(
    q: torch.Tensor,  # [N, Hk, dk]
    k: torch.Tensor,  # [N, Hk, dk]
    v: torch.Tensor,  # [N, Hv, dv]
    g: torch.Tensor,  # [N, Hv]
    beta: torch.Tensor,  # [N, Hv]
    state: torch.Tensor,  # [N, Hv, dk, dv] fp32, updated in place
    *,
    use_qk_l2norm: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode token for each of N sequences. Returns o [N, Hv, dv] fp32; `state` becomes S_t.

    The state is the big operand (N*Hv x dk x dv fp32: 32 MiB per layer at batch 32 on
    Qwen3.5-0.8B), so passes over it are what cost. With a = exp(g) and S_t = a S + k delta^T:
    S_t^T k-side and q-side products both come from one read of the old S,
        S^T [k, q] -> (u_k, u_q),  delta = beta (v - a u_k),  o = a u_q + (k . q) delta,
    then the update is one scaling and one rank-1 pass: 5 passes over S instead of 6."""
    q, k = _prepare(q, k, v.shape[1], use_qk_l2norm, scale, dim=1)
    return gated_delta_step_(q, k, v, g.to(F32).exp(), beta, state)


def gated_delta_step_(
    q: torch.Tensor,  # [N, H, dk] fp32, normalised and scaled
    k: torch.Tensor,  # [N, H, dk] fp32, normalised
    v: torch.Tensor,  # [N, H, dv] any float dtype
    a: torch.Tensor,  # [N, H] fp32 decay exp(g)
    beta: torch.Tensor,  # [N, H] any float dtype
    state: torch.Tensor,  # [N, H, dk, dv] fp32, updated in place
) -> torch.Tensor:
    """The recurrent step on prepared inputs (heads already repeated); o [N, H, dv] fp32.
    The reference of the CPU kernel's recurrent part (kernels/gated_delta_cpu.cpp), and decode's
    PyTorch path (layers/deltanet.py) wherever that kernel doesn't run."""
    N, H, dv = v.shape
    dk = k.shape[-1]
    NH = N * H
    S = state.view(NH, dk, dv)
    kq = torch.stack([k.reshape(NH, dk), q.reshape(NH, dk)], dim=1)  # [NH, 2, dk]
    u = torch.bmm(kq, S)  # [NH, 2, dv]: S^T k, S^T q of the old state
    a = a.reshape(NH, 1, 1)
    delta = (v.reshape(NH, 1, dv) - a * u[:, :1]).mul_(beta.reshape(NH, 1, 1))  # fp32
    S.mul_(a).baddbmm_(k.reshape(NH, dk, 1), delta)  # S = a S + k delta^T
    kdotq = (kq[:, :1] * kq[:, 1:]).sum(-1, keepdim=True)  # [NH, 1, 1]
    o = torch.addcmul(a * u[:, 1:], kdotq, delta)  # [NH, 1, dv]
    return o.view(N, H, dv)


def l2norm_qk(qk: torch.Tensor, num_v_heads: int, scale: float | None = None):
    """qk [N, 2, Hk, dk] (q then k, any dtype: adjacent channels of the conv output) -> fp32
    q (l2-normalised, times scale, default dk^-0.5) and k (l2-normalised), heads repeated to
    num_v_heads: [N, Hv, dk] each. `_prepare`, with both normalised in one pass."""
    x = l2norm(qk.to(F32))  # [N, 2, Hk, dk]
    return _prepare(x[:, 0], x[:, 1], num_v_heads, False, scale, dim=1)
