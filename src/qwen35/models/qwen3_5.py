"""The Qwen 3.5 text model, dense and MoE (MoE chosen by `cfg.is_moe`), over a flat varlen batch.

Parameter names and shapes are exactly transformers' `Qwen3_5ForCausalLM` /
`Qwen3_5MoeForCausalLM` state_dict keys, so `model.load_state_dict(hf.state_dict())` works.

Construction allocates with `torch.empty` only (no init). The loader can build on the meta
device and materialise later, or build directly on the target device:
    model = Qwen35ForCausalLM(cfg, dtype=torch.bfloat16, device="meta")
    model.to_empty(device="cpu")          # re-ties lm_head to embed_tokens when tied
    ... copy every checkpoint tensor into model.state_dict()[name] ...
`dtype=None` means torch.get_default_dtype().

Calls:
- `model(input_ids [T], batch: ForwardBatch, caches: ModelCaches) -> logits [S, V] float32`
  (S = len(batch.logits_indices)): the engine's path, mixing prefill chunks and decode tokens.
- `model(input_ids [B, T]) -> logits [B, T, V] float32`: no cache (temporary caches, same path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch, ModelCaches, allocate_caches
from qwen35.layers.deltanet import GatedDeltaNet
from qwen35.layers.full_attention import GatedAttention
from qwen35.layers.linear import Linear, empty_param, head_linear
from qwen35.layers.lora import LoraStep
from qwen35.layers.mlp import MLP
from qwen35.layers.moe import SparseMoE
from qwen35.layers.norms import RMSNorm
from qwen35.layers.rotary import RotaryEmbedding
from qwen35.models import cpu_decode
from qwen35.ops.backend import Backend
from qwen35.parallel.context import SINGLE, TensorParallel
from qwen35.parallel.linear import embed, gather_logits


class Embedding(nn.Module):
    # the rows' dtype when the table is stored narrower than the model computes (quant/apply.py
    # bf16_storage_meta); None: the table's
    out_dtype: torch.dtype | None = None

    def __init__(self, num: int, dim: int, dtype=None, device=None):
        super().__init__()
        self.weight = empty_param(num, dim, dtype=dtype, device=device)  # [V, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        h = F.embedding(ids, self.weight)
        return h if self.out_dtype is None else h.to(self.out_dtype)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_type: str, cache_index: int, dtype, device, tp=SINGLE
    ):
        super().__init__()
        H = cfg.hidden_size
        self.layer_type = layer_type
        self.cache_index = cache_index  # index into caches.key/value or caches.conv/recurrent
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, dtype, device, tp)
        else:
            self.self_attn = GatedAttention(cfg, dtype, device, tp)
        self.is_moe = cfg.is_moe
        if cfg.is_moe:
            self.mlp = SparseMoE(
                H,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.moe_intermediate_size,
                cfg.shared_expert_intermediate_size,
                dtype,
                device,
                tp,
            )
        else:
            self.mlp = MLP(H, cfg.intermediate_size, dtype, device, tp)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)

    def forward(
        self, h, delta, cos, sin, batch: ForwardBatch, caches: ModelCaches
    ) -> torch.Tensor:
        """h: [T, H] residual stream, updated in place (the caller owns it); delta: the previous
        layer's output not yet added to h (None for the first layer). Returns this layer's
        output (the caller adds it, fused into the next layer's first norm)."""
        be = batch.backend
        x = self.input_layernorm.add_forward(h, delta, be)  # h += delta; norm(h): [T, H]
        i = self.cache_index
        if self.layer_type == "linear_attention":
            x = self.linear_attn(x, batch, caches.conv[i], caches.recurrent[i])
        else:
            x = self.self_attn(x, cos, sin, batch, caches.key[i], caches.value[i])
        x = self.post_attention_layernorm.add_forward(h, x, be)  # h += attention out
        return self.mlp(x, be)


class Qwen35TextModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype=None,
        device=None,
        tp: TensorParallel = SINGLE,
        vision: bool = False,
    ):
        super().__init__()
        if vision:  # `model.visual.*`, the checkpoint's names
            from qwen35.models.vision import VisionModel

            self.visual = VisionModel(cfg.vision, dtype, device)
        # vocabulary-parallel: this rank's rows of the vocabulary padded to a multiple of tp
        V = tp.vocab_rows(cfg.vocab_size)
        self.embed_tokens = Embedding(V, cfg.hidden_size, dtype, device)  # [V, H]
        counts = {"linear_attention": 0, "full_attention": 0}
        layers = []
        for t in cfg.layer_types:
            layers.append(DecoderLayer(cfg, t, counts[t], dtype, device, tp))
            counts[t] += 1
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class Qwen35ForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype | None = None,
        device=None,
        tp: TensorParallel = SINGLE,
        vision: bool | None = None,
        mtp: bool = False,
    ):
        """tp: this process's rank of a tensor-parallel group (parallel/); it holds only its
        shard of every split weight and gets the full logits. vision: build the vision tower
        (default: when the config has one and tp is 1; under tensor parallelism the tower is
        whole, on the rank that encodes images). mtp: build the multi-token-prediction head
        (`mtp.*`, models/mtp.py) that drafts tokens for speculative decoding."""
        super().__init__()
        self.config = cfg
        self.tp = tp
        dtype = dtype or torch.get_default_dtype()
        vision = cfg.vision is not None and tp.size == 1 if vision is None else vision
        if vision and cfg.vision is None:
            raise ValueError("vision=True needs a config with a vision_config")
        self.model = Qwen35TextModel(cfg, dtype, device, tp, vision)
        # [V, H]; vocabulary-parallel like the embedding (logits gathered in compute_logits)
        self.lm_head = Linear(cfg.hidden_size, tp.vocab_rows(cfg.vocab_size), dtype, device)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section, cfg.yarn)
        if mtp:
            from qwen35.models.mtp import MTPHead

            # its KV cache: one more attention entry, after the main model's; under tensor
            # parallelism its layer is split like the others (fc and the norms replicated)
            self.mtp = MTPHead(cfg, cfg.num_full_attention_layers, dtype, device, tp)
        self.packed = False  # projections packed by post_load
        self._decode_plan = None  # models/cpu_decode.py, built at the first CPU decode step
        self._mtp_plan = None  # the same for the MTP head's layer
        # LoRA adapters served per request (layers/lora.py): the current step's rows per adapter
        self.lora_step = LoraStep()
        self.tie_weights()

    @property
    def has_mtp(self) -> bool:
        return hasattr(self, "mtp")

    @property
    def has_vision(self) -> bool:
        return hasattr(self.model, "visual")

    def encode_vision(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]):
        """Patches of several images / videos [N, C*tp*p*p] -> LM rows [N / merge^2, H]."""
        return self.model.visual(pixels, grids).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the norms'; quantized weights are stored in other dtypes)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' parameter when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def post_load(self) -> None:
        """Called by the loader once the weights are in place: pack the projections that read
        the same input into one weight each (decode reads them in one GEMV; see pack_linears)."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "pack", None)):
                m.pack()
        self.packed = True
        self._decode_plan = self._mtp_plan = None  # they hold the weights: built again

    def _apply(self, fn, recurse: bool = True):
        """`model.to(...)`, `.cuda()`, `.half()`: every parameter gets new storage, which
        leaves the packed weights behind (old device or dtype) and the parameters no longer
        views of them; pack again from the moved parameters."""
        out = super()._apply(fn, recurse)
        if self.packed:
            self.post_load()
        return out

    def to_empty(self, *, device, recurse: bool = True):
        out = super().to_empty(device=device, recurse=recurse)
        self.tie_weights()  # to_empty gives each module a fresh tensor: restore the tie
        return out

    # ---- the engine path -------------------------------------------------------------------
    @torch.no_grad()
    def forward_hidden(
        self, input_ids: torch.Tensor, batch: ForwardBatch, caches: ModelCaches
    ) -> torch.Tensor:
        """input_ids [T] -> last decoder layer's output [T, H] (before the final norm)."""
        if input_ids.dim() != 1:
            raise ValueError(
                f"input_ids must be flat [T] with a ForwardBatch, got {input_ids.shape}"
            )
        if input_ids.shape[0] != batch.num_tokens:
            raise ValueError(
                f"{input_ids.shape[0]} input ids for a ForwardBatch of {batch.num_tokens} tokens"
            )
        h = embed(self.model.embed_tokens, input_ids, self.tp)  # [T, H]
        if batch.mm_rows is not None:  # vision encoder outputs replace the pad tokens' rows
            h.index_copy_(0, batch.mm_rows, batch.mm_embeds.to(h.dtype))
        cos, sin = self._cos_sin(batch, h.dtype)
        plan = self._cpu_decode_plan(batch, caches)
        step = self.lora_step  # the adapted linears read it (layers/lora.py)
        step.groups, step.slots = batch.lora, batch.lora_slots
        try:
            if plan is not None:  # a pure decode step on a CPU: the layers as one kernel list
                delta = plan.run(h, cos, sin, batch, caches)
            else:
                delta = None
                for layer in self.model.layers:
                    delta = layer(h, delta, cos, sin, batch, caches)
        finally:
            step.groups = step.slots = None
        if delta is not None:
            h.add_(delta)
        if batch.state_copies:
            caches.copy_states(batch.state_copies)
        return h

    def _cos_sin(self, batch: ForwardBatch, dtype: torch.dtype):
        if batch.mrope_positions is not None:
            return self.rotary.cos_sin_mrope(batch.mrope_positions, dtype)
        return self.rotary.cos_sin(batch.positions, dtype)  # [T, rotary_dim]

    @torch.no_grad()
    def forward_mtp(
        self, next_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch, caches: ModelCaches,
        kv_only: bool = False,
    ) -> torch.Tensor | None:  # fmt: skip
        """The MTP head over the rows of the step that made `hidden` (its final norm's output
        [T, H]): next_ids [T] are the tokens that follow each row. -> the head's input rows
        [T, H] (head_logits of a row: the draft of the token after next). kv_only: only its
        layer's K / V (None: no row's output is wanted, MTPHead.write_kv)."""
        e = embed(self.model.embed_tokens, next_ids, self.tp)
        cos, sin = self._cos_sin(batch, e.dtype)
        if kv_only:
            self.mtp.write_kv(e, hidden, cos, sin, batch, caches)
            return None
        plan = self._cpu_decode_plan(batch, caches, mtp=True)
        return self.mtp(e, hidden, cos, sin, batch, caches, plan)

    def _cpu_decode_plan(self, batch: ForwardBatch, caches: ModelCaches, mtp: bool = False):
        """models/cpu_decode.py's plan when it applies to this step, else None (module path);
        mtp: the MTP head's layer's plan."""
        if not cpu_decode.DecodePlan.applies(batch) or not cpu_decode.supported(self, caches):
            return None
        if mtp:
            if self._mtp_plan is None:
                self._mtp_plan = cpu_decode.DecodePlan(self, self.mtp.layers)
            return self._mtp_plan
        if self._decode_plan is None:
            self._decode_plan = cpu_decode.DecodePlan(self)
        return self._decode_plan

    def compute_logits(self, hidden: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """Pre-norm hidden rows [S, H] -> logits [S, V] float32."""
        return self.head_logits(self.final_norm(hidden, backend))

    def final_norm(self, hidden: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """Pre-norm hidden rows [S, H] -> the head's input rows (the head screen reads them)."""
        return self.model.norm(hidden, backend)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input rows [S, H] -> logits [S, V] float32."""
        head = self.lm_head
        if type(head) is Linear and head.lora is None:  # bf16 rows past 8 on a CPU: 8 a call
            logits = head_linear(x, head.weight, head)  # [S, V / tp]
        else:
            logits = head(x)
        return gather_logits(logits, self.tp, self.config.vocab_size).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        batch: ForwardBatch | None = None,
        caches: ModelCaches | None = None,
        *,
        backend: Backend | None = None,
    ) -> torch.Tensor:
        """`backend` applies to uncached calls (a ForwardBatch carries its own)."""
        if batch is None:
            return self._forward_uncached(input_ids, backend)
        if caches is None:
            raise ValueError("a ForwardBatch needs ModelCaches (see allocate_caches)")
        h = self.forward_hidden(input_ids, batch, caches)
        with torch.no_grad():
            return self.compute_logits(h.index_select(0, batch.logits_indices), batch.backend)

    def _forward_uncached(self, input_ids: torch.Tensor, backend: Backend | None) -> torch.Tensor:
        """[B, T] -> [B, T, V]: every sequence from position 0 with temporary caches."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"without a ForwardBatch, input_ids must be [B, T], got {input_ids.shape}"
            )
        B, T = input_ids.shape
        dev = input_ids.device
        # one block per sequence
        caches = allocate_caches(self.config, B, T, B, self.dtype, dev, tp=self.tp.size)
        batch = uncached_batch(B, T, dev, backend=backend)
        return self.forward(input_ids.reshape(-1), batch, caches).view(B, T, -1)


def uncached_batch(B: int, T: int, device, backend: Backend | None = None) -> ForwardBatch:
    """B fresh sequences of T tokens, sequence i in block i (block_size T) and state slot i."""
    return ForwardBatch.build(
        positions=list(range(T)) * B,
        cu_seqlens=[i * T for i in range(B + 1)],
        context_lens=[T] * B,
        slot_mapping=range(B * T),
        block_tables=[[i] for i in range(B)],
        state_slots=range(B),
        has_initial_state=[False] * B,
        logits_indices=range(B * T),
        device=device,
        backend=backend,
    )
