"""Every weight tensor a Qwen 3.5 checkpoint holds, computed from the config: parameter counts
(text / vision / MTP) and weight bytes in BF16 and in the official block-FP8 format.

The inventory lists each tensor once with how many identical copies exist (layers x experts), the
part it belongs to, whether the official FP8 releases quantize it, and how tensor parallelism
splits it (used by `qwen35.plan.sharding`). Counting this way reproduces the article's table exactly
(architecture doc section 4). No torch here.

FP8 (architecture doc section 3.3): quantized tensors store 1 byte per weight plus one BF16
scale per 128x128 block (`weight_scale_inv` [ceil(out/128), ceil(in/128)], per expert for the
experts); every other tensor (embeddings, lm_head, GDN in_proj_a/b, routers, shared_expert_gate,
mtp.fc, norms, conv1d, A_log, dt_bias and the whole vision tower) stays BF16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen35.config import ModelConfig

PARTS = ("text", "vision", "mtp")
BF16_BYTES = 2
FP8_BYTES = 1
SCALE_BYTES = 2  # BF16 weight_scale_inv: the only scale dtype that reproduces the article's sizes
# FP8 blocks of one row (a compressed-tensors FP8 checkpoint's per-channel scales, a 4-bit one's
# groups held exactly on a GPU): the engine's fp32 scales (quant/layers.py), 4 / width bytes a
# weight, which unlike 128x128's 2 / 16,384 matter
ROW_SCALE_BYTES = 4
FP8_BLOCK = (128, 128)
# weight-only int8 / int4 (CPU, quantized at load by qwen35.quant; the engine stores exactly these)
INT8_SCALE_BYTES = 2  # one BF16 scale per output row
INT4_GROUP_BYTES = 4  # one BF16 scale + one BF16 zero per (group, output row)
INT4_LATTICE_GROUP = 32  # a GGUF file's 4-bit tensors kept under int4 (gguf_checkpoint int4_hint)
# lm_head (or the tied embedding) under int4: 6-bit weights in blocks of 64 inputs, 48 bytes + a
# BF16 scale per group of 32
INT6_BLOCK, INT6_BLOCK_BYTES = 64, 48 + 2 * 2
WEIGHT_DTYPES = ("bf16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor (or `count` identical copies of it).

    split: how tensor parallelism divides it; "col" splits dim 0 (output rows), "row" dim 1
    (input columns), "vocab" dim 0 by vocabulary, "kv" dim 0 by KV heads (replicated once tp
    exceeds them), "replicated" keeps it whole on every rank.
    parts: sizes of fused components along the split dimension (in_proj_qkv = q|k|v); each is
    split separately, so each must divide by tp (and by 128 per rank when FP8).
    """

    name: str
    part: str  # "text" | "vision" | "mtp"
    shape: tuple[int, ...]
    count: int = 1
    fp8: bool = False
    split: str = "replicated"
    parts: tuple[int, ...] = ()
    expert: bool = False  # a routed expert: expert parallelism divides `count`
    embedding: bool = False  # input embedding: a decode step reads only the looked-up rows

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def params(self) -> int:
        return self.count * self.numel


def fp8_block_scales(shape: tuple[int, ...], block: tuple[int, int] = (128, 128)) -> int:
    """Number of BF16 scales of one quantized 2-D tensor: one per (partial) 128x128 block."""
    out, inp = shape
    return math.ceil(out / block[0]) * math.ceil(inp / block[1])


def fp8_block(cfg: ModelConfig) -> tuple[int, int]:
    """The FP8 scale block the engine holds `cfg`'s weights in under fp8 (quant/apply.py
    fp8_block): an FP8 checkpoint's own (128 x 128 for the official releases; one row and 128 /
    g inputs for compressed-tensors FP8 ones), one row and the groups' width for a 4-bit
    checkpoint held exactly (CompressedConfig.fp8_rows), else 128 x 128 (quantized at load)."""
    if cfg.quantization is not None:
        return tuple(cfg.quantization.weight_block_size)
    if cfg.compressed is not None and (width := cfg.compressed.fp8_rows):
        return (1, width)
    return FP8_BLOCK


def int4_group(out: int, inp: int) -> int | None:
    """Group size of a matrix in int4 (torch's CPU layout needs out % 64 == 0 and groups of 32,
    64 or 128 inputs), or None: that matrix is stored in int8 instead."""
    if out % 64:
        return None
    return next((g for g in (128, 64, 32) if inp % g == 0), None)


def lattice_rows_ok(out: int) -> bool:
    """Whether a matrix of `out` rows keeps a GGUF file's 4-bit lattices under int4 (torch's int4
    layout: blocks of 64 rows); one that does not is quantized from its values."""
    return out % 64 == 0


def int_matrix_bytes(out: int, inp: int, fmt: str, kept: str | None = None) -> int:
    """Bytes of one [out, inp] matrix in weight-only `fmt` ("int8" / "int4") as quant/apply.py
    _int_linear stores it: int4 groups (int4_group) or, where none fits, per-row int8. kept (a
    GGUF file's tensor under int4, gguf_checkpoint int4_kind): "lattice", its 4-bit values kept
    in groups of 32; "int8", a type of more than 5 bits a weight held in int8."""
    if fmt == "int4" and kept == "lattice" and lattice_rows_ok(out):
        return out * inp // 2 + out * (inp // INT4_LATTICE_GROUP) * INT4_GROUP_BYTES
    g = int4_group(out, inp) if fmt == "int4" and kept != "int8" else None
    if g:
        return out * inp // 2 + out * (inp // g) * INT4_GROUP_BYTES
    return out * inp + out * INT8_SCALE_BYTES


def compressed_bytes_of(cfg: ModelConfig):
    """A `tensor_bytes` stand-in for plan.cpu, for a compressed-tensors / GPTQ / AWQ checkpoint
    (cfg.compressed): under int4 its 4-bit matrices (the FP8 set, as their recipes quantize) are
    held in int4 groups of the checkpoint's group size (32, 64, or 128 for wider groups and per
    channel: compressed_tensors.CompressedCheckpoint.quant_hint), its 8-bit ones in int8 rows;
    everything else as tensor_bytes counts it."""
    ints = [s for s in cfg.compressed.schemes if s.type == "int"]
    scheme = ints[0] if ints else None

    def of(t: Tensor, fmt: str, shape: tuple[int, ...] | None = None, count: int = 0) -> int:
        count = count or t.count  # (expert parallelism: a rank's share of the experts)
        if fmt != "int4" or scheme is None or not t.fp8 or output_head(t):
            return tensor_bytes(t, fmt, shape, count)
        out, inp = t.shape[-2], t.shape[-1]
        if scheme.num_bits == 8:
            return count * int_matrix_bytes(out, inp, "int8")
        g = scheme.group_size or inp
        L = next((c for c in (128, 64, 32) if g % c == 0 and inp % c == 0), None)
        if L is None or not lattice_rows_ok(out):
            return tensor_bytes(t, fmt, shape, count)
        return count * (out * inp // 2 + out * (inp // L) * INT4_GROUP_BYTES)

    return of


def int_quantized(t: Tensor) -> bool:
    """Whether weight-only int8 / int4 quantizes `t`: the FP8 set plus the embedding and lm_head
    of the text model (per-row int8; under int4 lm_head, or a tied embedding, int6: output_head)."""
    head = t.name.endswith(("embed_tokens.weight", "lm_head.weight")) and t.part == "text"
    return t.fp8 or head


def head_format(fmt: str, in_features: int) -> str:
    """lm_head's format under weight-only `fmt` ("int8" / "int4"), as qwen35.quant stores it: int6
    under int4 (6.5 bits a weight, the head being the largest read of a decode step; inputs in
    blocks of 64), else per-row int8."""
    return "int6" if fmt == "int4" and in_features % INT6_BLOCK == 0 else "int8"


def output_head(t: Tensor) -> bool:
    """lm_head, or the embedding a tied model reads every step as its head."""
    return t.part == "text" and (t.name.endswith("lm_head.weight")
                                 or (t.name.endswith("embed_tokens.weight") and not t.embedding))  # fmt: skip


def tensor_bytes(
    t: Tensor, dtype: str, shape: tuple[int, ...] | None = None, count: int = 0,
    block: tuple[int, int] = FP8_BLOCK,
) -> int:  # fmt: skip
    """Bytes of `count` copies of `t` (default its own shape/count) stored in `dtype`
    ("bf16" / "fp8" / "int8" / "int4"); FP8 in scale `block`s (fp8_block)."""
    shape = shape or t.shape
    count = count or t.count
    numel = math.prod(shape)
    if dtype == "fp8" and t.fp8:
        scale = SCALE_BYTES if block[0] > 1 else ROW_SCALE_BYTES
        return count * (numel * FP8_BYTES + fp8_block_scales(shape, block) * scale)
    if dtype in ("int8", "int4") and int_quantized(t):
        out, inp = shape[0], numel // shape[0]
        if output_head(t) and head_format(dtype, inp) == "int6":
            return count * out * (inp // INT6_BLOCK) * INT6_BLOCK_BYTES
        return count * int_matrix_bytes(out, inp, dtype if t.fp8 else "int8")
    return count * numel * BF16_BYTES


# ---- the inventory -------------------------------------------------------------------------


def _attention(cfg: ModelConfig, prefix: str, part: str, n: int) -> list[Tensor]:
    H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return [
        # q_proj holds q and the output gate, per-head interleaved: [2*nh*hd, H]
        Tensor(f"{prefix}.self_attn.q_proj.weight", part, (2 * nh * hd, H), n, True, "col"),
        Tensor(f"{prefix}.self_attn.k_proj.weight", part, (nkv * hd, H), n, True, "kv"),
        Tensor(f"{prefix}.self_attn.v_proj.weight", part, (nkv * hd, H), n, True, "kv"),
        Tensor(f"{prefix}.self_attn.o_proj.weight", part, (H, nh * hd), n, True, "row"),
        Tensor(f"{prefix}.self_attn.q_norm.weight", part, (hd,), n),
        Tensor(f"{prefix}.self_attn.k_norm.weight", part, (hd,), n),
    ]


def _deltanet(cfg: ModelConfig, prefix: str, part: str, n: int) -> list[Tensor]:
    H, nv = cfg.hidden_size, cfg.linear_num_value_heads
    Kd, Vd, C = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_dim
    qkv = (Kd, Kd, Vd)
    p = f"{prefix}.linear_attn"
    return [
        Tensor(f"{p}.in_proj_qkv.weight", part, (C, H), n, True, "col", qkv),
        Tensor(f"{p}.in_proj_z.weight", part, (Vd, H), n, True, "col"),
        Tensor(f"{p}.in_proj_b.weight", part, (nv, H), n, False, "col"),
        Tensor(f"{p}.in_proj_a.weight", part, (nv, H), n, False, "col"),
        Tensor(
            f"{p}.conv1d.weight", part, (C, 1, cfg.linear_conv_kernel_dim), n, False, "col", qkv
        ),
        Tensor(f"{p}.dt_bias", part, (nv,), n, False, "col"),
        Tensor(f"{p}.A_log", part, (nv,), n, False, "col"),
        Tensor(f"{p}.norm.weight", part, (cfg.linear_value_head_dim,), n),
        Tensor(f"{p}.out_proj.weight", part, (H, Vd), n, True, "row"),
    ]


def _ffn(cfg: ModelConfig, prefix: str, part: str, n: int) -> list[Tensor]:
    H = cfg.hidden_size
    p = f"{prefix}.mlp"
    if not cfg.is_moe:
        inter = cfg.intermediate_size
        return [
            Tensor(f"{p}.gate_proj.weight", part, (inter, H), n, True, "col"),
            Tensor(f"{p}.up_proj.weight", part, (inter, H), n, True, "col"),
            Tensor(f"{p}.down_proj.weight", part, (H, inter), n, True, "row"),
        ]
    E, Im, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    out = [
        Tensor(f"{p}.gate.weight", part, (E, H), n),  # router, BF16 and replicated
        # counted per expert (the FP8 releases store 2-D per-expert tensors, each with its scales)
        Tensor(
            f"{p}.experts.{{e}}.gate_proj.weight", part, (Im, H), n * E, True, "col", expert=True
        ),
        Tensor(f"{p}.experts.{{e}}.up_proj.weight", part, (Im, H), n * E, True, "col", expert=True),
        Tensor(
            f"{p}.experts.{{e}}.down_proj.weight", part, (H, Im), n * E, True, "row", expert=True
        ),
    ]
    if Is:
        out += [
            Tensor(f"{p}.shared_expert.gate_proj.weight", part, (Is, H), n, True, "col"),
            Tensor(f"{p}.shared_expert.up_proj.weight", part, (Is, H), n, True, "col"),
            Tensor(f"{p}.shared_expert.down_proj.weight", part, (H, Is), n, True, "row"),
            Tensor(f"{p}.shared_expert_gate.weight", part, (1, H), n),
        ]
    return out


def _norms(cfg: ModelConfig, prefix: str, part: str, n: int) -> list[Tensor]:
    H = cfg.hidden_size
    return [
        Tensor(f"{prefix}.input_layernorm.weight", part, (H,), n),
        Tensor(f"{prefix}.post_attention_layernorm.weight", part, (H,), n),
    ]


def text_tensors(cfg: ModelConfig) -> list[Tensor]:
    """The language model: embedding, decoder layers (GDN or gated attention + FFN), norm, head."""
    V, H = cfg.vocab_size, cfg.hidden_size
    n_lin, n_att, L = (
        cfg.num_linear_attention_layers,
        cfg.num_full_attention_layers,
        cfg.num_hidden_layers,
    )
    pre = "model.language_model"
    out = [
        Tensor(
            f"{pre}.embed_tokens.weight",
            "text",
            (V, H),
            split="vocab",
            embedding=not cfg.tie_word_embeddings,  # tied: read every step as the output head
        )
    ]
    if n_lin:
        out += _deltanet(cfg, f"{pre}.layers.{{i}}", "text", n_lin)
    if n_att:
        out += _attention(cfg, f"{pre}.layers.{{i}}", "text", n_att)
    out += _ffn(cfg, f"{pre}.layers.{{i}}", "text", L)
    out += _norms(cfg, f"{pre}.layers.{{i}}", "text", L)
    out.append(Tensor(f"{pre}.norm.weight", "text", (H,)))
    if not cfg.tie_word_embeddings:
        out.append(Tensor("lm_head.weight", "text", (V, H), split="vocab"))
    return out


def vision_tensors(cfg: ModelConfig) -> list[Tensor]:
    """The ViT (architecture doc sections 1.8 and 2); every Linear/Conv/LayerNorm has a bias.
    Kept BF16 in the FP8 releases and replicated under tensor parallelism."""
    v = cfg.vision
    if v is None:
        return []
    Hv, d, mlp = v.hidden_size, v.depth, v.intermediate_size
    m = v.spatial_merge_size**2 * Hv  # merger width: 2x2 patches concatenated
    pre = "model.visual"
    patch = (Hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    shapes = [
        ("patch_embed.proj.weight", patch, 1),
        ("patch_embed.proj.bias", (Hv,), 1),
        ("pos_embed.weight", (v.num_position_embeddings, Hv), 1),
        ("blocks.{i}.norm1.weight", (Hv,), d),
        ("blocks.{i}.norm1.bias", (Hv,), d),
        ("blocks.{i}.norm2.weight", (Hv,), d),
        ("blocks.{i}.norm2.bias", (Hv,), d),
        ("blocks.{i}.attn.qkv.weight", (3 * Hv, Hv), d),
        ("blocks.{i}.attn.qkv.bias", (3 * Hv,), d),
        ("blocks.{i}.attn.proj.weight", (Hv, Hv), d),
        ("blocks.{i}.attn.proj.bias", (Hv,), d),
        ("blocks.{i}.mlp.linear_fc1.weight", (mlp, Hv), d),
        ("blocks.{i}.mlp.linear_fc1.bias", (mlp,), d),
        ("blocks.{i}.mlp.linear_fc2.weight", (Hv, mlp), d),
        ("blocks.{i}.mlp.linear_fc2.bias", (Hv,), d),
        ("merger.norm.weight", (Hv,), 1),
        ("merger.norm.bias", (Hv,), 1),
        ("merger.linear_fc1.weight", (m, m), 1),
        ("merger.linear_fc1.bias", (m,), 1),
        ("merger.linear_fc2.weight", (v.out_hidden_size, m), 1),
        ("merger.linear_fc2.bias", (v.out_hidden_size,), 1),
    ]
    return [Tensor(f"{pre}.{name}", "vision", shape, n) for name, shape, n in shapes]


def mtp_tensors(cfg: ModelConfig) -> list[Tensor]:
    """The multi-token-prediction head: fc [H, 2H], three norms, and `mtp_num_hidden_layers`
    full-attention decoder layers with the model's FFN kind (architecture doc section 1.7)."""
    n = cfg.mtp_num_hidden_layers
    if not n:
        return []
    H = cfg.hidden_size
    out = [
        Tensor("mtp.fc.weight", "mtp", (H, 2 * H)),
        Tensor("mtp.pre_fc_norm_embedding.weight", "mtp", (H,)),
        Tensor("mtp.pre_fc_norm_hidden.weight", "mtp", (H,)),
        Tensor("mtp.norm.weight", "mtp", (H,)),
    ]
    out += _attention(cfg, "mtp.layers.{i}", "mtp", n)
    out += _ffn(cfg, "mtp.layers.{i}", "mtp", n)
    out += _norms(cfg, "mtp.layers.{i}", "mtp", n)
    return out


def weight_tensors(cfg: ModelConfig, text_only: bool = False) -> list[Tensor]:
    """Every tensor the deployment loads; `text_only` leaves out the vision tower and MTP head."""
    if text_only:
        return text_tensors(cfg)
    return text_tensors(cfg) + vision_tensors(cfg) + mtp_tensors(cfg)


# ---- totals --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    text: int
    vision: int
    mtp: int
    active: int  # text parameters one token runs through (MoE: top-k + shared experts only)

    @property
    def total(self) -> int:
        return self.text + self.vision + self.mtp


def param_counts(cfg: ModelConfig) -> ParamCounts:
    text = text_tensors(cfg)
    per = {
        p: sum(t.params for t in ts)
        for p, ts in (("text", text), ("vision", vision_tensors(cfg)), ("mtp", mtp_tensors(cfg)))
    }
    active = sum(t.params for t in text if not t.expert)
    if cfg.is_moe:
        active += (
            sum(t.params for t in text if t.expert) * cfg.num_experts_per_tok // cfg.num_experts
        )
    return ParamCounts(text=per["text"], vision=per["vision"], mtp=per["mtp"], active=active)


def has_fp8(cfg: ModelConfig) -> bool:
    """Whether an FP8 form of this model exists: an official release, or an FP8 config."""
    if cfg.quantization is not None:
        return True
    from qwen35 import catalog  # local import: catalog only matters for bundled names

    try:
        return catalog.has_fp8_release(cfg.name)
    except catalog.UnknownNameError:
        return False


def weight_bytes(cfg: ModelConfig, dtype: str, text_only: bool = False) -> int:
    """Bytes of all loaded weights on one device: "bf16" (2 B/param), "fp8" (official layout),
    "int8" / "int4" (weight-only, as qwen35.quant stores them)."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    of = bytes_fn(cfg, dtype)
    return sum(of(t) for t in weight_tensors(cfg, text_only))


def bytes_fn(cfg: ModelConfig, dtype: str, whole: bool = True):
    """tensor_bytes as the engine holds `cfg`'s weights in `dtype`: fn(t, shape=None, count=0).
    FP8 in the blocks it loads with (fp8_block); int8 / int4 of a compressed-tensors / GPTQ /
    AWQ checkpoint in its stored groups where a device holds whole tensors (`whole`: no tensor
    parallelism; under -tp N each rank quantizes its slices again, as tensor_bytes counts)."""
    if dtype in ("int8", "int4") and cfg.compressed is not None and whole:
        of = compressed_bytes_of(cfg)
        return lambda t, shape=None, count=0: of(t, dtype, shape, count)
    block = fp8_block(cfg) if dtype == "fp8" else FP8_BLOCK
    return lambda t, shape=None, count=0: tensor_bytes(t, dtype, shape, count, block)
