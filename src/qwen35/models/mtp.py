"""The multi-token-prediction head (`mtp.*`, architecture doc section 1.7): a draft model.

At position i it reads the main model's normed hidden state h_i (the final norm's output, the
head's input) and the embedding of the token x_{i+1} that follows, and predicts x_{i+2}:

    x = fc( cat[ norm_e(embed(x_{i+1})), norm_h(h_i) ] )      # embedding first; fc [H, 2H]
    x = decoder_layer(x)                                      # full attention + MLP / MoE
    logits = lm_head( norm(x) )                               # embedding and head: the main model's

Its attention layer keeps its own paged KV (one more `caches.key` / `caches.value` entry, at
`cache_index`), at the same positions and blocks as the main model's: it runs over the same
ForwardBatch as the step that produced h, so prefill chunks, decode rows and the verify rows of
speculative decoding need no batch of their own (engine/speculative.py).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch, ModelCaches
from qwen35.layers.linear import Linear
from qwen35.layers.norms import RMSNorm
from qwen35.parallel.context import SINGLE


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig, cache_index: int, dtype=None, device=None, tp=SINGLE):
        super().__init__()
        from qwen35.models.qwen3_5 import DecoderLayer

        if cfg.mtp_num_hidden_layers != 1:
            raise ValueError(
                f"the MTP head has {cfg.mtp_num_hidden_layers} layers; qwen35 runs the released "
                "layout of one (mtp_num_hidden_layers: 1)"
            )
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.fc = Linear(2 * H, H, dtype, device)  # [H, 2H]
        self.pre_fc_norm_embedding = RMSNorm(H, eps, dtype, device)
        self.pre_fc_norm_hidden = RMSNorm(H, eps, dtype, device)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, "full_attention", cache_index, dtype, device, tp)]
        )
        self.norm = RMSNorm(H, eps, dtype, device)

    @property
    def cache_index(self) -> int:
        return self.layers[0].cache_index

    def _fc(self, embeds, hidden, be) -> torch.Tensor:
        e = self.pre_fc_norm_embedding(embeds, be)
        h = self.pre_fc_norm_hidden(hidden.to(e.dtype), be)
        return self.fc(torch.cat([e, h], dim=-1))  # [T, H], the residual stream

    def write_kv(self, embeds, hidden, cos, sin, batch: ForwardBatch, caches: ModelCaches) -> None:
        """Only the layer's K and V of every row (at the batch's slots), for a pass whose rows
        no draft reads: later passes attend over complete KV, and this one costs fc and the K / V
        projections instead of the whole layer (no query, attention, o_proj, MLP or experts)."""
        be = batch.backend
        layer = self.layers[0]
        x = layer.input_layernorm(self._fc(embeds, hidden, be), be)
        i = layer.cache_index
        layer.self_attn.write_kv_only(x, cos, sin, batch, caches.key[i], caches.value[i])

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H] embeddings of the next tokens x_{i+1}
        hidden: torch.Tensor,  # [T, H] the main model's normed hidden states h_i
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        caches: ModelCaches,
        plan=None,
    ) -> torch.Tensor:
        """-> [T, H] the head's input rows (norm applied) of every row; writes the layer's KV
        at the batch's slots. plan: the layer as a CPU decode plan (models/cpu_decode.py),
        for a pure decode step."""
        be = batch.backend
        x = self._fc(embeds, hidden, be)
        if plan is not None:
            delta = plan.run(x, cos, sin, batch, caches)
        else:
            delta = self.layers[0](x, None, cos, sin, batch, caches)
        return self.norm.add_forward(x, delta, be)
