"""The gated delta rule (Gated DeltaNet's recurrence), three ways:

- `naive_gated_delta_rule`: one token at a time, the plain definition; the test oracle only.
- `chunk_gated_delta_rule`: chunks of 64 tokens for prefill; the intra-chunk work (UT transform,
  intra-chunk attention) is batched over all chunks and heads, only the state hand-off between
  chunks runs in a Python loop (T/64 steps).
- `recurrent_gated_delta_step`: one token for each of N sequences, state updated in place (decode).

All take fp32 inputs already prepared by the caller: `q` l2-normalised and scaled by dk^-0.5,
`k` l2-normalised, value heads already matched (q/k repeated to nv heads), `g` the log-decay
(<= 0) and `beta` in (0, 1). The state S of one head is [dk, dv]:
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S^T k_t))^T  (S decayed first),  o_t = S_t^T q_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (FLA's and transformers' convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_gated_delta_rule(
    q: torch.Tensor,  # [B, T, H, dk]
    k: torch.Tensor,  # [B, T, H, dk]
    v: torch.Tensor,  # [B, T, H, dv]
    g: torch.Tensor,  # [B, T, H]
    beta: torch.Tensor,  # [B, T, H]
    initial_state: torch.Tensor | None = None,  # [B, H, dk, dv]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reference. Returns o [B, T, H, dv] and the final state [B, H, dk, dv]."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.clone()
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
    matrices with fp32 denormals, whose CPU slow path makes the GEMMs up to 3x slower; terms
    that small are far below fp32 resolution next to the O(1) recent-token terms."""
    return x.masked_fill(x < -60.0, -torch.inf).exp_()


def _diag_blocks(m: torch.Tensor, size: int) -> torch.Tensor:
    """The diagonal size x size blocks of m [..., C, C] as a view: [..., C // size, size, size]."""
    nb = m.shape[-1] // size
    m = m.view(*m.shape[:-2], nb, size, nb, size)
    return torch.diagonal(m, 0, -4, -2).movedim(-1, -3)


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + strictly_lower(a))^-1 for a: [..., C, C], C a power of two (the diagonal of a is
    ignored). Recursive 2x2 block inversion, [[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1,
    Z^-1]], from 1x1 blocks up: log2(C) levels of batched matmuls instead of a LAPACK
    triangular solve per matrix; as accurate as forward substitution in our tests."""
    C = a.shape[-1]
    low = a.tril(-1)
    inv = torch.eye(C, dtype=a.dtype, device=a.device).expand_as(a).clone()
    s = 1
    while s < C:
        ib, lb = _diag_blocks(inv, 2 * s), _diag_blocks(low, 2 * s)  # [..., C/2s, 2s, 2s]
        ib[..., s:, :s] = -(ib[..., s:, s:] @ lb[..., s:, :s] @ ib[..., :s, :s])
        s *= 2
    return inv


def _chunk_major(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """[B, N*C, H, ...] -> [N, B*H, C, ...] contiguous, so each chunk's slice is contiguous."""
    B, _, H = x.shape[:3]
    x = x.reshape(B, N, C, H, *x.shape[3:]).movedim(1, 0).movedim(2, 3)  # [N, B, H, C, ...]
    return x.reshape(N, B * H, C, *x.shape[4:])


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [B, T, H, dk]
    k: torch.Tensor,  # [B, T, H, dk]
    v: torch.Tensor,  # [B, T, H, dv]
    g: torch.Tensor,  # [B, T, H]
    beta: torch.Tensor,  # [B, T, H]
    initial_state: torch.Tensor | None = None,  # [B, H, dk, dv]
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form (UT transform). Returns o [B, T, H, dv] and the final state [B, H, dk, dv].

    A sequence shorter than `chunk_size` is one chunk of its own length (no padding); longer ones
    are zero-padded to a multiple of `chunk_size` (g = 0, beta = 0 steps leave S unchanged).
    Work is laid out chunk-major, [N chunks, B*H, C, d], so per-chunk slices are contiguous.
    """
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (_chunk_major(x, N, C) for x in (q, k, v))  # [N, BH, C, d]
    beta = _chunk_major(beta, N, C)[..., None]  # [N, BH, C, 1]
    gam = _chunk_major(g, N, C).cumsum(-1)  # within-chunk cumulative log-decay: [N, BH, C]

    # decay[i, j] = exp(gam_i - gam_j) for j <= i, else 0: [N, BH, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = _exp_cut((gam[..., :, None] - gam[..., None, :]).masked_fill_(~causal, -torch.inf))
    k_beta = k * beta  # [N, BH, C, dk]
    # T = I + A, A = strictly_lower((beta k) k^T * decay); then U = T^-1 (beta v) and
    # W = T^-1 (beta exp(gam) k) as GEMMs.
    ut = (k_beta @ k.transpose(-1, -2)).mul_(decay)  # [N, BH, C, C]
    if C & (C - 1) == 0:
        t_inv = unit_lower_inverse(ut)  # [N, BH, C, C]
    else:  # a short sequence of odd length: one chunk of its own size
        eye = torch.eye(C, dtype=q.dtype, device=q.device).expand_as(ut)
        t_inv = torch.linalg.solve_triangular(ut, eye, upper=False, unitriangular=True)
    egam = _exp_cut(gam)[..., None]  # [N, BH, C, 1]
    u = t_inv @ (v * beta)  # [N, BH, C, dv]
    w = t_inv @ (k_beta * egam)  # [N, BH, C, dk]

    g_last = gam[..., -1:]  # [N, BH, 1]
    k_dec = k * _exp_cut(g_last - gam)[..., None]  # keys decayed to the chunk end: [N, BH, C, dk]
    chunk_decay = _exp_cut(g_last)[..., None]  # [N, BH, 1, 1]

    # Sequential hand-off of S between chunks: V' = U - W S, S = exp(gam_last) S + K_dec^T V'.
    BH = B * H
    S = q.new_zeros(BH, dk, dv) if initial_state is None else initial_state.reshape(BH, dk, dv)
    states = q.new_empty(N, BH, dk, dv)  # S entering each chunk
    v_new = torch.empty_like(u)  # [N, BH, C, dv]
    for n in range(N):
        states[n] = S
        torch.baddbmm(u[n], w[n], S, alpha=-1.0, out=v_new[n])  # [BH, C, dv]
        S = torch.baddbmm(S * chunk_decay[n], k_dec[n].transpose(-1, -2), v_new[n])

    # All chunks at once: O = (Q exp(gam)) S_in + ((Q K^T) * decay) V'
    o = (q * egam) @ states  # [N, BH, C, dv]
    o.add_((q @ k.transpose(-1, -2)).mul_(decay) @ v_new)
    o = o.view(N, B, H, C, dv).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, dv)[:, :T]
    return o, S.reshape(B, H, dk, dv)


def recurrent_gated_delta_step(
    q: torch.Tensor,  # [N, H, dk]
    k: torch.Tensor,  # [N, H, dk]
    v: torch.Tensor,  # [N, H, dv]
    g: torch.Tensor,  # [N, H]
    beta: torch.Tensor,  # [N, H]
    state: torch.Tensor,  # [N, H, dk, dv] fp32, updated in place
) -> torch.Tensor:
    """One decode token for each of N sequences. Returns o [N, H, dv]; `state` becomes S_t."""
    N, H, dk = k.shape
    dv = v.shape[-1]
    S = state.view(N * H, dk, dv)
    S.mul_(g.exp().reshape(N * H, 1, 1))
    kv = torch.bmm(k.reshape(N * H, 1, dk), S)  # S^T k: [NH, 1, dv]
    delta = (v.reshape(N * H, 1, dv) - kv).mul_(beta.reshape(N * H, 1, 1))  # [NH, 1, dv]
    S.baddbmm_(k.reshape(N * H, dk, 1), delta)  # S += k delta^T
    return torch.bmm(q.reshape(N * H, 1, dk), S).view(N, H, dv)
