"""Causal depthwise conv1d with a carried state, followed by SiLU (Gated DeltaNet's short conv).

Per channel c: u[t, c] = sum_j w[c, j] * x[t - (K-1) + j, c], j = K-1 the current token. Inputs
before the sequence start come from the conv state: the last K-1 pre-conv inputs, stored
channel-major [C, K-1] (cache_spec's layout), zeros for a fresh sequence.

Numerics follow transformers: the conv accumulates in fp32 and is rounded once to the input
dtype, then SiLU runs in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_causal_conv1d(
    x: torch.Tensor,  # [T, C] pre-conv inputs of one sequence
    weight: torch.Tensor,  # [C, K]
    state: torch.Tensor | None = None,  # [C, K-1]
) -> torch.Tensor:
    """Reference through F.conv1d (what transformers runs). Returns silu(conv) [T, C]."""
    T, C = x.shape
    K = weight.shape[1]
    prev = x.new_zeros(C, K - 1) if state is None else state.to(x.dtype)
    ext = torch.cat([prev, x.t()], dim=1).float()  # [C, K-1+T]
    y = F.conv1d(ext[None], weight.float()[:, None, :], groups=C)[0]  # [C, T]
    return F.silu(y.to(x.dtype)).t()


def causal_conv1d(
    x: torch.Tensor,  # [T, C] pre-conv inputs of one sequence (prefill chunk)
    weight: torch.Tensor,  # [C, K]
    state: torch.Tensor | None = None,  # [C, K-1] previous inputs, None = zeros
) -> torch.Tensor:
    """Prefill. Returns silu(conv) [T, C] in x.dtype. Shifted multiply-adds on the token-major
    layout (no transpose, no concatenated copy); the first K-1 rows also read the state."""
    T, C = x.shape
    K = weight.shape[1]
    w = weight.t().float()  # [K, C]
    xf = x.float()
    y = xf * w[K - 1]  # current token: [T, C] fp32
    for j in range(K - 1):
        sh = K - 1 - j  # tap j reads the input sh tokens back
        if sh < T:
            y[sh:].addcmul_(xf[: T - sh], w[j])
        if state is not None:  # rows t < sh read state column (K-1) - sh + t
            m = min(sh, T)
            y[:m].addcmul_(state[:, K - 1 - sh : K - 1 - sh + m].t().float(), w[j])
    if x.dtype == torch.float32:
        return F.silu(y, inplace=True)
    return F.silu(y.to(x.dtype))  # rounded once, then SiLU in the model dtype


def conv_state_at(
    x: torch.Tensor,  # [T, C] new inputs
    state: torch.Tensor | None,  # [C, K-1] state before them, None = zeros
    n: int,
    kernel_size: int,
) -> torch.Tensor:
    """Conv state [C, K-1] after the first n new inputs: the last K-1 inputs seen."""
    km1 = kernel_size - 1
    if n >= km1:
        return x[n - km1 : n].t()
    prev = state if state is not None else x.new_zeros(x.shape[1], km1)
    return torch.cat([prev[:, n:], x[:n].t().to(prev.dtype)], dim=1)


def causal_conv1d_update_(
    x: torch.Tensor,  # [N, C] one new token for each of N sequences
    weight: torch.Tensor,  # [C, K]
    state: torch.Tensor,  # [N, C, K-1], updated in place (e.g. a view of the cache)
) -> torch.Tensor:
    """Decode, in place: returns silu(conv) [N, C] and shifts x into `state` (the conv
    accumulates in fp32, rounded once to x's dtype, as in prefill)."""
    window = torch.cat([state, x.to(state.dtype)[:, :, None]], dim=2)  # [N, C, K]
    state.copy_(window[:, :, 1:])
    y = (window.float() * weight.float()).sum(-1)  # [N, C] fp32
    return F.silu(y.to(x.dtype))
