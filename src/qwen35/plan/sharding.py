"""Tensor- and expert-parallel rules: which layouts a checkpoint can be split into, and what
each rank holds. The engine's TP code and the planner use the same functions. No torch here.

Tensor parallelism (tp ranks) splits, per layer:
- gated attention by query heads (q_proj rows, o_proj columns); K/V by KV heads while
  tp <= num_kv_heads, one replicated KV head per rank beyond (cache_spec.kv_heads_per_rank);
- Gated DeltaNet by heads: in_proj_qkv / conv1d per q|k|v component, in_proj_z/a/b, dt_bias,
  A_log by value heads, out_proj columns; so tp must divide the 16 key heads and the value heads;
- the dense MLP and every expert (routed and shared) by intermediate size;
- embed_tokens and lm_head by vocabulary (padded up to a multiple of tp).
Norms, routers, shared_expert_gate, mtp.fc and the vision tower are replicated.

Expert parallelism (ep ranks, --ep) instead gives each rank num_experts / ep whole routed experts;
the shared expert stays tensor-parallel.

Block FP8 adds one rule: every rank's shard of a quantized tensor must be whole 128x128 scale
blocks along the split dimension (k/v: of the KV heads it holds), or the checkpoint's scales
cannot be divided (vLLM #52997: 35B-A3B-FP8 at tp=8 gives 512/8 = 64 expert rows per rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen35.cache_spec import kv_heads_per_rank
from qwen35.config import ModelConfig
from qwen35.errors import Qwen35Error
from qwen35.plan.params import Tensor, bytes_fn, fp8_block, weight_tensors


class LayoutError(Qwen35Error, ValueError):
    """A parallel layout the model or its checkpoint cannot be split into; says why."""


def _short(name: str) -> str:
    """`model.language_model.layers.{i}.mlp.experts.{e}.gate_proj.weight` -> `mlp.experts.gate_proj`."""
    parts = [
        p for p in name.split(".") if p not in ("model", "language_model", "{i}", "{e}", "weight")
    ]
    if parts and parts[0] == "layers":
        parts = parts[1:]
    return ".".join(parts)


def layout_problems(cfg: ModelConfig, tp: int, ep: int = 1, dtype: str = "bf16") -> list[str]:
    """Reasons the layout is impossible (empty list: it is fine)."""
    if tp < 1 or ep < 1:
        return [f"tp and ep must be >= 1 (got tp={tp}, ep={ep})"]
    problems: list[str] = []
    nh = cfg.num_attention_heads
    if cfg.num_full_attention_layers or cfg.mtp_num_hidden_layers:
        if nh % tp:
            problems.append(f"tp={tp} does not divide the {nh} attention heads")
        try:
            kv_heads_per_rank(cfg.num_key_value_heads, tp)
        except ValueError as e:
            problems.append(str(e))
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if cfg.num_linear_attention_layers and (nk % tp or nv % tp):
        problems.append(f"tp={tp} must divide the DeltaNet key heads ({nk}) and value heads ({nv})")
    if ep > 1:
        if not cfg.is_moe:
            problems.append(f"ep={ep}: expert parallelism needs an MoE model")
        elif cfg.num_experts % ep:
            problems.append(f"ep={ep} does not divide the {cfg.num_experts} experts")
    if problems:
        return problems  # the per-tensor checks below assume heads divide
    fp8 = dtype == "fp8"
    rows, inputs = fp8_block(cfg)  # (one-row blocks: inputs split in whole blocks still)
    bad: dict[str, list[str]] = {}  # one reason -> the tensors it applies to

    def add(reason: str, t: Tensor) -> None:
        names = bad.setdefault(reason, [])
        if _short(t.name) not in names:
            names.append(_short(t.name))

    for t in weight_tensors(cfg):
        if t.split == "kv" and fp8 and t.fp8 and tp > 1:  # whole KV heads, split or replicated
            per = kv_heads_per_rank(cfg.num_key_value_heads, tp) * cfg.head_dim
            if per % rows:  # rank r's rows start at a multiple of `per`
                add(
                    f"{cfg.num_key_value_heads} KV heads of {cfg.head_dim} over {tp} ranks give "
                    f"{per} rows per rank, not whole {rows}-wide FP8 scale blocks",
                    t,
                )
            continue
        if t.split not in ("col", "row") or (t.expert and ep > 1):
            continue
        dim = t.shape[0] if t.split == "col" else t.shape[1]
        what = "input columns" if t.split == "row" else "rows"
        block = inputs if t.split == "row" else rows
        for size in t.parts or (dim,):
            if size % tp:
                reason = f"{size} {what} do not split {tp} ways"
            elif fp8 and t.fp8 and (size // tp) % block:
                reason = (
                    f"{size} {what} split {tp} ways give {size // tp} per rank, not whole "
                    f"{block}-wide FP8 scale blocks"
                )
            else:
                continue
            add(reason, t)
    for reason, names in bad.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        problems.append(f"{shown}: {reason}")
    return problems


def validate_layout(cfg: ModelConfig, tp: int, ep: int = 1, dtype: str = "bf16") -> None:
    """Raise LayoutError naming every reason the layout is impossible, and the sizes that work."""
    problems = layout_problems(cfg, tp, ep, dtype)
    if problems:
        ok = valid_tp_sizes(cfg, ep if ep > 1 else 1, dtype)
        hint = f"; tensor-parallel sizes that work: {', '.join(map(str, ok))}" if ok else ""
        if cfg.is_moe and ep == 1 and tp > 1 and not layout_problems(cfg, tp, tp, dtype):
            hint += f" (or tp={tp} with expert parallelism, --ep)"
        raise LayoutError(
            f"{cfg.name} ({dtype}) cannot be split tp={tp}"
            + (f", ep={ep}" if ep > 1 else "")
            + ": "
            + "; ".join(problems)
            + hint
        )


def valid_tp_sizes(
    cfg: ModelConfig, ep: int = 1, dtype: str = "bf16", limit: int = 64
) -> list[int]:
    return [tp for tp in range(1, limit + 1) if not layout_problems(cfg, tp, ep, dtype)]


def shard_shape(t: Tensor, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """One tensor-parallel rank's slice of `t` (the layout must be valid)."""
    if tp == 1 or t.split == "replicated":
        return t.shape
    rest = t.shape[1:]
    if t.split == "col":
        return (t.shape[0] // tp, *rest)
    if t.split == "row":
        return (t.shape[0], t.shape[1] // tp, *t.shape[2:])
    if t.split == "vocab":
        return (math.ceil(t.shape[0] / tp), *rest)
    if t.split == "kv":
        return (kv_heads_per_rank(cfg.num_key_value_heads, tp) * cfg.head_dim, *rest)
    raise ValueError(f"unknown split {t.split!r} of {t.name}")


@dataclass(frozen=True)
class RankWeights:
    """Bytes of weights one GPU holds, by how a decode step reads them."""

    dense: int  # read in full every step (attention, DeltaNet, dense MLP, shared expert, head)
    experts: int  # routed experts: a step reads only the experts its tokens are routed to
    embedding: int  # the untied input embedding: a step reads only the looked-up rows
    idle: int  # vision tower and MTP head: loaded but not read by text decode

    @property
    def total(self) -> int:
        return self.dense + self.experts + self.embedding + self.idle


def rank_weights(
    cfg: ModelConfig, dtype: str, tp: int = 1, ep: int = 1, text_only: bool = False,
    bytes_of=None,
) -> RankWeights:  # fmt: skip
    """What one GPU of a tp x ep layout holds (with ep > 1, ep GPUs share the routed experts).
    bytes_of: fn(t, shape, count) for weights held as a file stores them where one rank holds
    whole tensors (a GGUF file's: plan/gguf.py rank_bytes), else the config's formulas."""
    validate_layout(cfg, tp, ep, dtype)
    acc = {"dense": 0, "experts": 0, "embedding": 0, "idle": 0}
    of = bytes_of if bytes_of is not None and tp == 1 else bytes_fn(cfg, dtype, whole=tp == 1)
    for t in weight_tensors(cfg, text_only):
        if t.expert and ep > 1:
            n = of(t, t.shape, t.count // ep)
        else:
            n = of(t, shard_shape(t, cfg, tp))
        kind = (
            "idle"
            if t.part != "text"
            else "experts"
            if t.expert
            else "embedding"
            if t.embedding
            else "dense"
        )
        acc[kind] += n
    return RankWeights(**acc)


# projections of one input that the engine runs as one matmul (layers/linear.py packing)
_SAME_INPUT = {"gate_proj": "gate_up", "up_proj": "gate_up", "q_proj": "qkv", "k_proj": "qkv",
               "v_proj": "qkv", "in_proj_qkv": "in", "in_proj_z": "in"}  # fmt: skip


def dequant_buffer_bytes(cfg: ModelConfig, tp: int = 1) -> int:
    """The buffer int8 / int4 products of more than quant/int_gpu.py's DENSE_GEMM_MAX_ROWS rows
    dequantize a weight into on a GPU (one reused BF16 matrix for cuBLAS): the largest matrix
    one rank multiplies at once, same-input projections packed together (a dense MLP's gate and
    up, an expert's: unstacked experts run one at a time), the head and embedding excepted (read
    by their GEMV). Stacked experts dequantize nothing (their grouped GEMM reads the codes)."""
    runs: dict[tuple[str, str], int] = {}
    for t in weight_tensors(cfg, text_only=True):
        if not t.fp8 or len(t.shape) != 2:  # (the int formats' matrices but head / embedding)
            continue
        prefix, leaf = t.name.removesuffix(".weight").rsplit(".", 1)
        out, inp = t.shape if t.expert else shard_shape(t, cfg, tp)
        key = (prefix, _SAME_INPUT.get(leaf, leaf))
        runs[key] = runs.get(key, 0) + out * inp
    return 2 * max(runs.values(), default=0)


def lora_slot_bytes(cfg: ModelConfig, max_loras: int, max_rank: int, tp: int = 1) -> int:
    """What one GPU holds for LoRA adapters served per request (`--enable-lora` / `--lora-modules`:
    layers/lora.py LoraSlots): every linear layer of the decoder (the 2-D weights of its layers
    but the routed experts) gets max_loras x max_rank rows of A [., in] and B^T [., out] of
    this rank's in / out, in bf16."""
    if not max_loras:
        return 0
    total = 0
    for t in weight_tensors(cfg, text_only=True):
        if ".layers." in t.name and len(t.shape) == 2 and not t.expert and t.part == "text":
            out, inp = shard_shape(t, cfg, tp)
            total += t.count * max_loras * max_rank * (out + inp) * 2
    return total
