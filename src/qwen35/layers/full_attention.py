"""Gated full attention (`layers.i.self_attn`), architecture doc section 1.3.

q_proj emits [q | gate] per head (rows h*2hd .. h*2hd+hd are q of head h, the next hd its gate);
q_norm / k_norm are zero-centred RMSNorms over head_dim applied before partial RoPE; the output
is multiplied by sigmoid(gate) before o_proj. New K/V go into the paged cache at slot_mapping;
prefill sequences attend over their context (the fresh K/V directly when nothing is cached),
single-token sequences attend together through their block tables (ops/attention.py
dispatches to the Triton kernels on a GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch
from qwen35.layers.linear import Linear, pack_linears, packed_linear
from qwen35.layers.norms import RMSNorm
from qwen35.layers.rotary import apply_rotary, apply_rotary_qk
from qwen35.ops.attention import (
    attention_decode_gated,
    cached_prefill_attention,
    cpu_prefill_kernel,
    paged_decode_attention,
    prefill_attention,
    write_kv,
)
from qwen35.parallel.context import SINGLE, TensorParallel


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None, tp: TensorParallel = SINGLE):
        super().__init__()
        H = cfg.hidden_size
        # this rank's heads: query heads split, KV heads split or replicated (parallel/context.py)
        self.nh, self.nkv = tp.part(cfg.num_attention_heads), tp.kv_heads(cfg.num_key_value_heads)
        self.hd = cfg.head_dim
        self.scale = self.hd**-0.5
        self.q_proj = Linear(H, 2 * self.nh * self.hd, dtype, device)  # [2 nh hd, H]
        self.k_proj = Linear(H, self.nkv * self.hd, dtype, device)  # [nkv hd, H]
        self.v_proj = Linear(H, self.nkv * self.hd, dtype, device)
        self.o_proj = Linear(self.nh * self.hd, H, dtype, device)  # [H, nh hd], row-parallel
        self.tp = tp  # o_proj's partial outputs are summed over the ranks
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, dtype, device)
        self.packed_qkv: torch.Tensor | None = None  # q_proj, k_proj, v_proj, see pack()

    def pack_groups(self) -> list[tuple[tuple[Linear, ...], int]]:
        """The linears pack() packs (and rows_multiple): the loader allocates them as one."""
        return [((self.q_proj, self.k_proj, self.v_proj), 1)]

    def pack(self) -> None:
        """One [2 nh hd + 2 nkv hd, H] weight for q/k/v (after loading)."""
        self.packed_qkv = pack_linears(*self.pack_groups()[0][0])

    def write_kv_only(self, x, cos, sin, batch: ForwardBatch, key_cache, value_cache) -> None:
        """Only the K / V of x's rows into the cache (what forward writes, no attention): the
        MTP head's pass where no draft reads its output (models/mtp.py write_kv)."""
        nkv, hd, be = self.nkv, self.hd, batch.backend
        k = self.k_norm(self.k_proj(x).unflatten(-1, (nkv, hd)), be)
        v = self.v_proj(x).unflatten(-1, (nkv, hd))
        write_kv(key_cache, value_cache, apply_rotary(k, cos, sin), v, batch.slot_mapping)

    def forward(
        self,
        x: torch.Tensor,  # [T, H] normed hidden states
        cos: torch.Tensor,  # [T, rotary_dim] in the model dtype
        sin: torch.Tensor,
        batch: ForwardBatch,
        key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd]
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        T = x.shape[0]
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qg, k, v = packed_linear(x, self.packed_qkv, self.q_proj, self.k_proj, self.v_proj)
        be = batch.backend
        d = batch.decode
        if not batch.prefill and d is not None:  # decode only: on a CPU, one fused kernel call
            o = attention_decode_gated(be, qg, k, v, self.q_norm, self.k_norm, cos, sin,
                                       key_cache, value_cache, batch.slot_mapping, d,
                                       self.scale)  # fmt: skip
            if o is not None:
                return self.tp.all_reduce(self.o_proj(o))
        qg = qg.unflatten(-1, (nh, 2 * hd))  # [T, nh, 2 hd]
        gate = qg[..., hd:].reshape(T, nh * hd)
        q = self.q_norm(qg[..., :hd], be)  # [T, nh, hd], a fresh tensor
        k = self.k_norm(k.unflatten(-1, (nkv, hd)), be)  # [T, nkv, hd]
        q, k = apply_rotary_qk(q, k, cos, sin, be)
        v = v.unflatten(-1, (nkv, hd))
        write_kv(key_cache, value_cache, k, v, batch.slot_mapping)

        if d is not None and d.all_rows:  # a pure decode step: the output gate in the kernel
            gate = gate.view(T, nh, hd)
            o = paged_decode_attention(be, q, key_cache, value_cache, d, self.scale, gate)
            return self.tp.all_reduce(self.o_proj(o.view(T, nh * hd)))
        o = q.new_empty(T, nh, hd)
        # first chunks attend to their own K / V here, unless the CPU kernel reads every chunk
        # from the cache
        fresh = cpu_prefill_kernel(be, q, key_cache) is None
        if fresh and key_cache.dtype != k.dtype and any(sp.start_pos == 0 for sp in batch.prefill):
            # K / V as the cache holds them (bf16 / fp16 under fp32, fp8) for the prompts
            # attending to their own: the values their later chunks, a prefix-cache hit and the
            # decode steps read back, so results do not depend on how a prompt was cut
            k, v = k.to(key_cache.dtype).to(k.dtype), v.to(value_cache.dtype).to(v.dtype)
        for sp in batch.prefill:
            r = sp.rows
            if sp.start_pos == 0 and fresh:  # the context is exactly the new tokens
                o[r] = prefill_attention(q[r], k[r], v[r], self.scale)
            else:
                row = batch.block_tables[sp.index]
                o[r] = cached_prefill_attention(
                    be, q[r], key_cache, value_cache, row, sp.start_pos, self.scale
                )
        if d is not None:
            qd = q.index_select(0, d.rows)
            od = paged_decode_attention(be, qd, key_cache, value_cache, d, self.scale)
            o.index_copy_(0, d.rows, od.to(o.dtype))
        o = o.view(T, nh * hd).mul_(gate.sigmoid_())  # gate is a fresh copy (reshape)
        return self.tp.all_reduce(self.o_proj(o))  # [T, H]
