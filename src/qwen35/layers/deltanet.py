"""Gated DeltaNet token mixer (`layers.i.linear_attn`), architecture doc section 1.2.

Projections run once over the flat batch; the causal conv and the gated delta rule run per
prefill sequence (chunked, state from its slot or zeros) and for all single-token sequences at
once (recurrent step, states gathered by slot and scattered back). A prefill sequence with state
checkpoints is split at those offsets so each checkpoint's state is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import ModelConfig
from qwen35.layers.linear import Linear, empty_param, pack_linears, packed_linear
from qwen35.layers.norms import GatedRMSNorm
from qwen35.model_caches import StepPlan
from qwen35.ops.conv import causal_conv1d, causal_conv1d_update, conv_state_at
from qwen35.ops.gated_delta import (
    CHUNK_SIZE,
    chunk_gated_delta_rule,
    recurrent_gated_delta_step,
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
        qkv = qkv.contiguous()  # a column view when packed (the conv reads rows)
        z = z.unflatten(-1, (self.nv, self.dv))  # [T, nv, dv]
        beta = torch.sigmoid(b)  # [T, nv], in the model dtype like transformers
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

        u = self._conv(qkv, plan, conv_cache)  # [T, C] after silu
        q, k, v = u.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.view(T, self.nk, self.dk)  # raw: the kernels l2-normalise q, k in fp32
        k = k.view(T, self.nk, self.dk)
        v = v.view(T, self.nv, self.dv)
        o = x.new_empty(T, self.nv, self.dv)  # kernel output, cast to the model dtype
        self._delta(q, k, v, g, beta, plan, rec_cache, o)
        if plan.decode is not None:
            for slot, dest in plan.decode.checkpoints:
                conv_cache[dest] = conv_cache[slot]
                rec_cache[dest] = rec_cache[slot]
        y = self.norm(o, z)  # [T, nv, dv]
        return self.out_proj(y.view(T, self.value_dim))

    def _conv(self, qkv: torch.Tensor, plan: StepPlan, conv_cache: torch.Tensor) -> torch.Tensor:
        w = self.conv1d.weight[:, 0, :]  # [C, K]
        K = self.kernel_size
        pieces = []
        for sp in plan.prefill:
            state = conv_cache[sp.slot] if sp.has_initial_state else None  # [C, K-1]
            xs = qkv[sp.rows]  # [n, C]
            pieces.append((sp.rows, causal_conv1d(xs, w, state)))
            for n, dest in sp.checkpoints:
                conv_cache[dest] = conv_state_at(xs, state, n, K)
            conv_cache[sp.slot] = conv_state_at(xs, state, sp.num_tokens, K)
        d = plan.decode
        if d is None and len(pieces) == 1 and pieces[0][1].shape[0] == qkv.shape[0]:
            return pieces[0][1]  # one prefill sequence: no reassembly
        u = torch.empty_like(qkv)
        for rows, y in pieces:
            u[rows] = y
        if d is not None:
            state = conv_cache.index_select(0, d.slots)  # [N, C, K-1]
            if d.fresh is not None:
                state[d.fresh] = 0
            y, new_state = causal_conv1d_update(qkv.index_select(0, d.rows), w, state)
            u.index_copy_(0, d.rows, y)
            conv_cache.index_copy_(0, d.slots, new_state.to(conv_cache.dtype))
        return u

    def _delta(self, q, k, v, g, beta, plan: StepPlan, rec_cache, o: torch.Tensor) -> None:
        """q, k: [T, nk, dk]; v: [T, nv, dv]; g (fp32), beta: [T, nv] -> o [T, nv, dv]."""
        for sp in plan.prefill:
            S = rec_cache[sp.slot][None] if sp.has_initial_state else None  # [1, nv, dk, dv]
            for a, b, inside in _segments(sp.checkpoints, sp.num_tokens, CHUNK_SIZE):
                r = slice(sp.row0 + a, sp.row0 + b)
                _, S = chunk_gated_delta_rule(
                    q[r][None], k[r][None], v[r][None], g[r][None], beta[r][None], S,
                    use_qk_l2norm=True, out=o[r][None],
                    states_at=[(n - a, rec_cache[dest][None]) for n, dest in inside],
                )  # fmt: skip
                for n, dest in sp.checkpoints:
                    if n == b:
                        rec_cache[dest] = S[0]
            rec_cache[sp.slot] = S[0]
        d = plan.decode
        if d is not None and rec_cache.dtype == torch.float32 and d.rows_by_slot is not None:
            # in place on each run of consecutive slots: no [N, nv, dk, dv] gather + scatter
            # (~13% of a batch-32 bf16 decode step of Qwen3.5-0.8B)
            rows = d.rows_by_slot
            qd, kd, vd, gd, bd = (t.index_select(0, rows) for t in (q, k, v, g, beta))
            od = torch.empty(rows.shape[0], *o.shape[1:], dtype=torch.float32, device=o.device)
            for i0, s0, n in d.slot_runs:
                S = rec_cache[s0 : s0 + n]  # [n, nv, dk, dv] view of the cache
                if d.fresh_by_slot is not None:
                    S[d.fresh_by_slot[i0 : i0 + n]] = 0
                sl = slice(i0, i0 + n)
                od[sl] = recurrent_gated_delta_step(
                    qd[sl], kd[sl], vd[sl], gd[sl], bd[sl], S, use_qk_l2norm=True
                )
            o.index_copy_(0, rows, od.to(o.dtype))
        elif d is not None:
            S = rec_cache.index_select(0, d.slots).float()  # [N, nv, dk, dv]
            if d.fresh is not None:
                S[d.fresh] = 0
            r = d.rows
            od = recurrent_gated_delta_step(
                q.index_select(0, r), k.index_select(0, r), v.index_select(0, r),
                g.index_select(0, r), beta.index_select(0, r), S, use_qk_l2norm=True,
            )  # fmt: skip
            o.index_copy_(0, r, od.to(o.dtype))
            rec_cache.index_copy_(0, d.slots, S.to(rec_cache.dtype))


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
