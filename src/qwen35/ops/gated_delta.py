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
    q: torch.Tensor,  # [B, H, T, dk]
    k: torch.Tensor,  # [B, H, T, dk]
    v: torch.Tensor,  # [B, H, T, dv]
    g: torch.Tensor,  # [B, H, T]
    beta: torch.Tensor,  # [B, H, T]
    initial_state: torch.Tensor | None = None,  # [B, H, dk, dv]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reference. Returns o [B, H, T, dv] and the final state [B, H, dk, dv]."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.clone()
    o = q.new_empty(B, H, T, dv)
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        kv = (S * k[:, :, t, :, None]).sum(-2)  # S^T k: [B, H, dv]
        delta = (v[:, :, t] - kv) * beta[:, :, t, None]  # [B, H, dv]
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]  # outer product [B, H, dk, dv]
        o[:, :, t] = (S * q[:, :, t, :, None]).sum(-2)
    return o, S


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [B, H, T, dk]
    k: torch.Tensor,  # [B, H, T, dk]
    v: torch.Tensor,  # [B, H, T, dv]
    g: torch.Tensor,  # [B, H, T]
    beta: torch.Tensor,  # [B, H, T]
    initial_state: torch.Tensor | None = None,  # [B, H, dk, dv]
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form (UT transform). Returns o [B, H, T, dv] and the final state [B, H, dk, dv].

    A sequence shorter than `chunk_size` is one chunk of its own length (no padding); longer ones
    are zero-padded to a multiple of `chunk_size` (g = 0, beta = 0 steps leave S unchanged).
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    BH = B * H
    q = q.reshape(BH, N, C, dk)
    k = k.reshape(BH, N, C, dk)
    v = v.reshape(BH, N, C, dv)
    beta = beta.reshape(BH, N, C, 1)
    gam = g.reshape(BH, N, C).cumsum(-1)  # within-chunk cumulative log-decay: [BH, N, C]

    # decay[i, j] = exp(gam_i - gam_j) for j <= i, else 0: [BH, N, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
    k_beta = k * beta  # [BH, N, C, dk]
    # (I + A) with A = strictly_lower((beta k) k^T * decay); unitriangular ignores the diagonal.
    ut = (k_beta @ k.transpose(-1, -2)).mul_(decay)  # [BH, N, C, C]
    egam = gam.exp()[..., None]  # [BH, N, C, 1]
    rhs = torch.cat([v * beta, k_beta * egam], dim=-1)  # [BH, N, C, dv + dk]
    sol = torch.linalg.solve_triangular(ut, rhs, upper=False, unitriangular=True)
    u, w = sol[..., :dv], sol[..., dv:]  # U = T^-1 (beta v), W = T^-1 (beta exp(gam) k)

    g_last = gam[..., -1:]  # [BH, N, 1]
    k_dec = k * (g_last - gam).exp_()[..., None]  # keys decayed to the chunk end: [BH, N, C, dk]
    chunk_decay = g_last.exp()[..., None]  # [BH, N, 1, 1]

    # Sequential hand-off of S between chunks: V' = U - W S, S = exp(gam_last) S + K_dec^T V'.
    S = q.new_zeros(BH, dk, dv) if initial_state is None else initial_state.reshape(BH, dk, dv)
    states = q.new_empty(BH, N, dk, dv)  # S entering each chunk
    v_new = torch.empty_like(u)  # [BH, N, C, dv]
    for n in range(N):
        states[:, n] = S
        vn = torch.baddbmm(u[:, n], w[:, n], S, alpha=-1.0)  # [BH, C, dv]
        v_new[:, n] = vn
        S = torch.baddbmm(S * chunk_decay[:, n], k_dec[:, n].transpose(-1, -2), vn)

    # All chunks at once: O = (Q exp(gam)) S_in + ((Q K^T) * decay) V'
    o = (q * egam) @ states  # [BH, N, C, dv]
    o.add_((q @ k.transpose(-1, -2)).mul_(decay) @ v_new)
    o = o.reshape(B, H, N * C, dv)[:, :, :T]
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
