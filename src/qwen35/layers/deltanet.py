"""Gated DeltaNet token mixer (`layers.i.linear_attn`), architecture doc section 1.2.

Projections run once over the flat batch; the causal conv and the gated delta rule run per
prefill sequence (chunked, state from its slot or zeros) and for all single-token sequences at
once (on each run of consecutive state slots, in place: the fused CPU kernel of kernels/ where
it runs, else `_decode_torch`, its PyTorch twin). State checkpoints inside
a prefill are exact: on the chunk grid they come from the kernel, elsewhere the sequence is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35 import kernels
from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import DecodePlan, StepPlan
from qwen35.layers.linear import Linear, empty_param, pack_linears, packed_linear
from qwen35.layers.norms import GatedRMSNorm
from qwen35.ops.conv import causal_conv1d, causal_conv1d_update_, conv_state_at
from qwen35.ops.gated_delta import (
    CHUNK_SIZE,
    chunk_gated_delta_rule,
    gated_delta_step_,
    l2norm_qk,
)


class DepthwiseConv(nn.Module):
    """Holds `conv1d.weight` [C, 1, K] (transformers' nn.Conv1d layout, no bias)."""

    def __init__(self, channels: int, kernel_size: int, dtype=None, device=None):
        super().__init__()
        self.weight = empty_param(channels, 1, kernel_size, dtype=dtype, device=device)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        H = cfg.hidden_size
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        C = cfg.linear_conv_dim
        self.in_proj_qkv = Linear(H, C, dtype, device)  # [C, H], channels [q | k | v]
        self.in_proj_z = Linear(H, self.value_dim, dtype, device)  # [Vd, H]
        self.in_proj_b = Linear(H, self.nv, dtype, device)  # [nv, H]
        self.in_proj_a = Linear(H, self.nv, dtype, device)  # [nv, H]
        self.conv1d = DepthwiseConv(C, self.kernel_size, dtype, device)
        self.dt_bias = empty_param(self.nv, dtype=dtype, device=device)
        self.A_log = empty_param(self.nv, dtype=dtype, device=device)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, dtype, device)
        self.out_proj = Linear(self.value_dim, H, dtype, device)  # [H, Vd]
        self.packed_in: torch.Tensor | None = None  # the four in_proj weights, see pack()

    def in_projs(self) -> tuple[Linear, ...]:
        return (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a)

    def pack(self) -> None:
        """One [C + Vd + 2 nv, H] weight for the four input projections (after loading)."""
        self.packed_in = pack_linears(*self.in_projs())

    def forward(
        self,
        x: torch.Tensor,  # [T, H] normed hidden states
        plan: StepPlan,
        conv_cache: torch.Tensor,  # [num_slots, C, K-1]
        rec_cache: torch.Tensor,  # [num_slots, nv, dk, dv]
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv, z, b, a = packed_linear(x, self.packed_in, *self.in_projs())  # [T, C], [T, Vd], ...
        z = z.unflatten(-1, (self.nv, self.dv))  # [T, nv, dv]
        beta = torch.sigmoid(b)  # [T, nv], in the model dtype like transformers
        g = F.softplus(a.float() + self.dt_bias).mul_(self.A_log.float().exp().neg_())  # fp32
        o = x.new_empty(T, self.nv, self.dv)  # kernel output, cast to the model dtype
        if plan.prefill:
            self._prefill(qkv, g, beta, plan, conv_cache, rec_cache, o)
        if plan.decode is not None:
            self._decode(qkv, g, beta, plan.decode, conv_cache, rec_cache, o)
        y = self.norm(o, z)  # [T, nv, dv]
        return self.out_proj(y.view(T, self.value_dim))

    def _prefill(self, qkv, g, beta, plan: StepPlan, conv_cache, rec_cache, o) -> None:
        """Each prefill sequence: causal conv from its slot's state, then the chunked rule,
        split only at checkpoints off the chunk grid (see _segments)."""
        w = self.conv1d.weight[:, 0, :]  # [C, K]
        kd = self.key_dim
        for sp in plan.prefill:
            xs = qkv[sp.rows]  # [n, C]
            state = conv_cache[sp.slot] if sp.has_initial_state else None  # [C, K-1]
            u = causal_conv1d(xs, w, state)  # [n, C] after silu
            for n, dest in sp.checkpoints:
                conv_cache[dest] = conv_state_at(xs, state, n, self.kernel_size)
            conv_cache[sp.slot] = conv_state_at(xs, state, sp.num_tokens, self.kernel_size)
            q = u[:, :kd].unflatten(-1, (self.nk, self.dk))  # raw: the kernel l2-normalises
            k = u[:, kd : 2 * kd].unflatten(-1, (self.nk, self.dk))
            v = u[:, 2 * kd :].unflatten(-1, (self.nv, self.dv))
            gs, bs, os = g[sp.rows], beta[sp.rows], o[sp.rows]
            S = rec_cache[sp.slot][None] if sp.has_initial_state else None  # [1, nv, dk, dv]
            for a, b, inside in _segments(sp.checkpoints, sp.num_tokens, CHUNK_SIZE):
                _, S = chunk_gated_delta_rule(
                    q[None, a:b], k[None, a:b], v[None, a:b], gs[None, a:b], bs[None, a:b], S,
                    use_qk_l2norm=True, out=os[None, a:b],
                    states_at=[(n - a, rec_cache[dest][None]) for n, dest in inside],
                )  # fmt: skip
                for n, dest in sp.checkpoints:
                    if n == b:
                        rec_cache[dest] = S[0]
            rec_cache[sp.slot] = S[0]

    def _decode(self, qkv, g, beta, d: DecodePlan, conv_cache, rec_cache, o) -> None:
        """All single-token sequences at once, in slot order, their conv and recurrent states
        updated in place on each run of consecutive slots (no gather/scatter of the states).
        On a CPU the step after the projections is one compiled kernel call per run
        (kernels/gated_delta_cpu.cpp): at batch 1 this layer is dispatch-bound, and the
        PyTorch formulation below takes ~40 small ops."""
        if not d.all_rows_in_slot_order:  # gather the decode rows into slot order
            qkv, g, beta = (t.index_select(0, d.rows_by_slot) for t in (qkv, g, beta))
        w = self.conv1d.weight[:, 0, :]  # [C, K]
        if d.fresh_by_slot is not None:
            for i0, s0, n in d.slot_runs:
                fresh = d.fresh_by_slot[i0 : i0 + n]
                conv_cache[s0 : s0 + n][fresh] = 0
                rec_cache[s0 : s0 + n][fresh] = 0
        fused = _fused_decode(rec_cache)
        pieces = []
        for i0, s0, n in d.slot_runs:
            r, cs, S = slice(i0, i0 + n), conv_cache[s0 : s0 + n], rec_cache[s0 : s0 + n]
            if fused is not None:
                pieces.append(fused(qkv[r], cs, w, g[r], beta[r], S, self.nk))
            else:
                pieces.append(self._decode_torch(qkv[r], w, g[r], beta[r], cs, S))
        od = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # [N, nv, dv] fp32
        if d.all_rows_in_slot_order:
            o.copy_(od)
        else:
            o.index_copy_(0, d.rows_by_slot, od.to(o.dtype))
        for slot, dest in d.checkpoints:
            conv_cache[dest] = conv_cache[slot]
            rec_cache[dest] = rec_cache[slot]

    def _decode_torch(self, qkv, w, g, beta, conv_state, state) -> torch.Tensor:
        """One run of consecutive slots in PyTorch ops (the fused kernel's reference)."""
        kd = self.key_dim
        u = causal_conv1d_update_(qkv, w, conv_state)  # [n, C]
        q, k = l2norm_qk(u[:, : 2 * kd].unflatten(-1, (2, self.nk, self.dk)), self.nv)
        v = u[:, 2 * kd :].unflatten(-1, (self.nv, self.dv))  # [n, nv, dv]
        S32 = state if state.dtype == torch.float32 else state.float()
        y = gated_delta_step_(q, k, v, g.exp(), beta, S32)  # [n, nv, dv] fp32
        if S32 is not state:
            state.copy_(S32)
        return y


def _fused_decode(rec_cache: torch.Tensor):
    """The compiled DeltaNet decode step where it applies (CPU, fp32 states), else None."""
    if not rec_cache.is_cpu or rec_cache.dtype != torch.float32:
        return None
    mod = kernels.load()
    return None if mod is None else mod.deltanet_decode


def _segments(checkpoints: list[tuple[int, int]], num_tokens: int, chunk: int):
    """Split a prefill of num_tokens at the checkpoint offsets that are not on the chunk grid of
    their segment; (a, b, checkpoints strictly inside on the grid) per segment. Checkpoints on the
    grid come out of the chunked kernel's hand-off between chunks, so the usual interval
    checkpoints (multiples of 64 from a 64-aligned start) cost no extra kernel call."""
    out, a, inside = [], 0, []
    for n, dest in checkpoints:  # sorted by offset
        if n < num_tokens and (n - a) % chunk == 0:
            inside.append((n, dest))
        elif n < num_tokens:
            out.append((a, n, inside))
            a, inside = n, []
    out.append((a, num_tokens, inside))
    return out
