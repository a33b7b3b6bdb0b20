"""Gated DeltaNet token mixer (`layers.i.linear_attn`), architecture doc section 1.2.

Projections run once over the flat batch; the causal conv and the gated delta rule run through
the backend's ops (ops/deltanet.py): the prefill chunks (chunked rule, state from the slot or
zeros, exact prefix-cache checkpoints) and all single-token rows at once (recurrent step).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch
from qwen35.layers.linear import Linear, empty_param, pack_linears, packed_linear
from qwen35.layers.norms import GatedRMSNorm
from qwen35.ops.deltanet import (
    Dims,
    deltanet_decode,
    deltanet_decode_gated,
    deltanet_gates,
    deltanet_prefill,
)
from qwen35.parallel.context import SINGLE, TensorParallel


class DepthwiseConv(nn.Module):
    """Holds `conv1d.weight` [C, 1, K] (transformers' nn.Conv1d layout, no bias)."""

    def __init__(self, channels: int, kernel_size: int, dtype=None, device=None):
        super().__init__()
        self.weight = empty_param(channels, 1, kernel_size, dtype=dtype, device=device)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None, tp: TensorParallel = SINGLE):
        super().__init__()
        H = cfg.hidden_size
        # this rank's key and value heads (tensor parallelism splits both; conv channels and
        # in_proj_qkv rows hold this rank's part of each of q, k and v)
        self.nk, self.nv = tp.part(cfg.linear_num_key_heads), tp.part(cfg.linear_num_value_heads)
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.kernel_size = cfg.linear_conv_kernel_dim
        self.dims = Dims(self.nk, self.nv, self.dk, self.dv, self.kernel_size)
        C = 2 * self.key_dim + self.value_dim  # this rank's conv channels (cfg.linear_conv_dim at tp=1)
        self.in_proj_qkv = Linear(H, C, dtype, device)  # [C, H], channels [q | k | v]
        self.in_proj_z = Linear(H, self.value_dim, dtype, device)  # [Vd, H]
        self.in_proj_b = Linear(H, self.nv, dtype, device)  # [nv, H]
        self.in_proj_a = Linear(H, self.nv, dtype, device)  # [nv, H]
        self.conv1d = DepthwiseConv(C, self.kernel_size, dtype, device)
        self.dt_bias = empty_param(self.nv, dtype=dtype, device=device)
        self.A_log = empty_param(self.nv, dtype=dtype, device=device)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, dtype, device)
        self.out_proj = Linear(self.value_dim, H, dtype, device)  # [H, Vd], row-parallel
        self.tp = tp  # out_proj's partial outputs are summed over the ranks
        self.packed_in: torch.Tensor | None = None  # the four in_proj weights, see pack()

    def in_projs(self) -> tuple[Linear, ...]:
        return (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a)

    def pack_groups(self) -> list[tuple[tuple[Linear, ...], int]]:
        """The linears pack() packs (and rows_multiple): the loader allocates them as one."""
        return [(self.in_projs(), 1)]

    def pack(self) -> None:
        """One [C + Vd + 2 nv, H] weight for the four input projections (after loading)."""
        self.packed_in = pack_linears(*self.in_projs())

    def forward(
        self,
        x: torch.Tensor,  # [T, H] normed hidden states
        batch: ForwardBatch,
        conv_cache: torch.Tensor,  # [num_slots, C, K-1]
        rec_cache: torch.Tensor,  # [num_slots, nv, dk, dv]
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv, z, b, a = packed_linear(x, self.packed_in, *self.in_projs())  # [T, C], [T, Vd], ...
        be = batch.backend
        w = self.conv1d.weight[:, 0, :]  # [C, K]
        if not batch.prefill:  # decode only: on a CPU, one fused kernel call
            y = deltanet_decode_gated(be, qkv, z, a, b, w, self.dt_bias, self.A_log,
                                      self.norm.weight, self.norm.eps, self.dims, batch.decode,
                                      conv_cache, rec_cache)  # fmt: skip
            if y is not None:
                return self.tp.all_reduce(self.out_proj(y))
        z = z.unflatten(-1, (self.nv, self.dv))  # [T, nv, dv]
        g, beta = deltanet_gates(be, a, b, self.dt_bias, self.A_log)  # [T, nv] fp32, model dtype
        o = x.new_empty(T, self.nv, self.dv)  # kernel output, cast to the model dtype
        if batch.prefill:
            deltanet_prefill(be, qkv, g, beta, w, self.dims, batch.prefill, conv_cache,
                             rec_cache, o)  # fmt: skip
        if batch.decode is not None:
            deltanet_decode(be, qkv, g, beta, w, self.dims, batch.decode, conv_cache,
                            rec_cache, o)  # fmt: skip
        y = self.norm(o, z, be)  # [T, nv, dv]
        return self.tp.all_reduce(self.out_proj(y.view(T, self.value_dim)))  # [T, H]
