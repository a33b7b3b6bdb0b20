"""Memory arithmetic for a deployment and the recommendations of `qwen35 plan`. No torch here.

Per GPU, serving needs (each term a function the engine imports and allocates with):

    weights(dtype, tp, ep)                          sharding.rank_weights
  + runtime_overhead_bytes(tp)                      CUDA context, library workspaces, NCCL, slack
  + working_memory_bytes(cfg, chunk, rows, tp)      activations of one prefill chunk + logits
  + sequences x state_bytes_per_sequence            cache_spec: DeltaNet conv + recurrent state
  + tokens resident x kv_bytes_per_token            cache_spec: full-attention layers only

Under tensor parallelism all five are per rank; `dp` = num_gpus / tp replicas each serve their
own sequences. Decode speed is a roofline: the bytes a step must read over the GPU's bandwidth
(or its FLOPs over the dense BF16 peak, whichever is slower), ignoring communication: an upper
bound that real engines reach a fraction of.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from qwen35.cache_spec import (
    MAX_SPECULATIVE_TOKENS,
    SPECULATIVE_METHODS,
    CacheSpec,
    cache_spec,
    dtype_bytes,
    kv_heads_per_rank,
)
from qwen35.catalog.gpus import GpuSpec
from qwen35.config import ModelConfig
from qwen35.errors import Qwen35Error
from qwen35.plan.decode_bytes import decode_bytes
from qwen35.plan.params import (
    WEIGHT_DTYPES,
    ParamCounts,
    has_fp8,
    param_counts,
    weight_bytes,
)
from qwen35.plan.sharding import (
    LayoutError,
    RankWeights,
    dequant_buffer_bytes,
    layout_problems,
    lora_slot_bytes,
    rank_weights,
    validate_layout,
)

GIB = 2**30
INT_DTYPES = ("int8", "int4")  # weight-only: activations in BF16
# CUDA context (~0.5 GiB), cuBLAS / attention workspaces, allocator slack, driver reservations
RUNTIME_OVERHEAD_BYTES = GIB
NCCL_OVERHEAD_BYTES = GIB // 2  # communicator buffers and the all-reduce workspace when tp > 1
DEFAULT_PREFILL_CHUNK = 2048  # tokens one prefill step processes (the scheduler's token budget)
DEFAULT_CONTEXT = 32_768
ACTIVATION_FACTOR = 2  # temporaries between ops and allocator rounding over the live tensors
GDN_CHUNK = 64  # the chunked gated delta rule's chunk length


class PlanError(Qwen35Error, ValueError):
    """An impossible planning request (numbers out of range, a dtype without weights)."""


def runtime_overhead_bytes(tp: int = 1) -> int:
    """Memory a GPU loses before any tensor of ours: CUDA context and kernels' workspaces
    (1 GiB), plus NCCL buffers (0.5 GiB) when it talks to other ranks."""
    return RUNTIME_OVERHEAD_BYTES + (NCCL_OVERHEAD_BYTES if tp > 1 else 0)


def working_memory_bytes(
    cfg: ModelConfig, chunk_tokens: int, sampled_rows: int, dtype: str = "bf16", tp: int = 1
) -> int:
    """Peak activation memory of one forward over `chunk_tokens` tokens on one TP rank, plus
    the fp32 logits (and the sampler's probabilities) of `sampled_rows` rows over the vocabulary.

    Layers run one at a time, so the peak is the residual stream plus the largest layer:
      stream    2*T*H                           hidden + normed input
      deltanet  T*(2C + Vd + 2nv)/tp            in_proj_qkv, conv output, z, a and b (dtype)
                + T*nv*(3dk + 3dv + 3*64)/tp*4  fp32 q, k, v, w, u, output, chunk matrices
                + T/64 * nv*dk*dv/tp*4          fp32 state at every chunk boundary
      attention T*(4nh*hd/tp + 2kv_r*hd)        q+gate, k, v, output (flash attention: no T^2)
      mlp       T*3I/tp                         gate, up, silu(gate)*up
      moe       T*E*4 + T*k*(2H + 3Im_r) + T*3Is/tp   router logits, dispatched rows, shared
    times ACTIVATION_FACTOR for temporaries, plus sampled_rows*V*4*2 for logits.
    """
    if chunk_tokens < 1 or sampled_rows < 0:
        raise PlanError("chunk_tokens must be >= 1 and sampled_rows >= 0")
    b = dtype_bytes(dtype)
    T, H, V = chunk_tokens, cfg.hidden_size, cfg.vocab_size
    stream = 2 * T * H * b
    layer = 0
    if cfg.num_linear_attention_layers:
        nv, dk, dv = (
            cfg.linear_num_value_heads // tp,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
        )
        C, Vd = cfg.linear_conv_dim // tp, cfg.linear_value_dim // tp
        gdn = T * (2 * C + Vd + 2 * nv) * b
        gdn += T * nv * (3 * dk + 3 * dv + 3 * GDN_CHUNK) * 4
        gdn += math.ceil(T / GDN_CHUNK) * nv * dk * dv * 4
        layer = max(layer, gdn)
    if cfg.num_full_attention_layers or cfg.mtp_num_hidden_layers:
        nh, hd = cfg.num_attention_heads // tp, cfg.head_dim
        kv_r = kv_heads_per_rank(cfg.num_key_value_heads, tp)
        layer = max(layer, T * (4 * nh * hd + 2 * kv_r * hd) * b)
    if cfg.is_moe:
        # each rank computes every dispatched row in the worst case (all of one token's experts here)
        k, im = cfg.num_experts_per_tok, cfg.moe_intermediate_size // tp
        moe = T * cfg.num_experts * 4 + T * k * (2 * H + 3 * im) * b
        moe += T * 3 * (cfg.shared_expert_intermediate_size // tp) * b
        layer = max(layer, moe)
    else:
        layer = max(layer, T * 3 * (cfg.intermediate_size // tp) * b)
    logits = sampled_rows * V * 4 * 2
    return ACTIVATION_FACTOR * (stream + layer) + logits


def moe_touched_fraction(cfg: ModelConfig, tokens: int) -> float:
    """Expected fraction of the routed experts a step over `tokens` tokens reads: with uniform
    routing each expert is missed by one token with probability 1 - k/E."""
    if not cfg.is_moe or tokens <= 0:
        return 1.0 if not cfg.is_moe else 0.0
    return 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens


@dataclass(frozen=True)
class Deployment:
    """One way to serve a model: dtypes and parallel layout (tp x dp = num_gpus)."""

    cfg: ModelConfig
    dtype: str = "bf16"  # weights: "bf16" | "fp8" | "int8" | "int4" (weight-only, Triton GEMVs)
    kv_dtype: str = "bf16"
    state_dtype: str | None = None  # DeltaNet recurrent state; None: the config's (fp32)
    tp: int = 1
    dp: int = 1
    ep: bool = False  # MoE: routed experts divided whole across all tp*dp GPUs
    text_only: bool = False
    chunk_tokens: int = DEFAULT_PREFILL_CHUNK
    speculative_tokens: int = 0  # drafts per step (`--num-speculative-tokens`)
    lora_slots: tuple[int, int] = (0, 0)  # LoRA adapters per request: (max_loras, max_lora_rank)
    speculative_method: str = "mtp"  # drafts from the MTP head (its KV layer) or "ngram" (none)
    # weights held as a file stores them (a GGUF file's: plan/gguf.py rank_bytes), else None
    bytes_of: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def num_gpus(self) -> int:
        return self.tp * self.dp

    @property
    def ep_size(self) -> int:
        return self.num_gpus if self.ep and self.cfg.is_moe else 1

    @cached_property
    def rank_weights(self) -> RankWeights:
        """What one GPU holds (validates the layout: raises LayoutError); LoRA slots are read
        in full every step (dense)."""
        w = rank_weights(self.cfg, self.dtype, self.tp, self.ep_size, self.text_only,
                         self.bytes_of)  # fmt: skip
        lora = lora_slot_bytes(self.cfg, *self.lora_slots, tp=self.tp)
        return RankWeights(w.dense + lora, w.experts, w.embedding, w.idle)

    @cached_property
    def rank_params(self) -> RankWeights:
        """The same split counted in parameters (for FLOPs)."""
        w = rank_weights(self.cfg, "bf16", self.tp, self.ep_size, self.text_only)
        return RankWeights(w.dense // 2, w.experts // 2, w.embedding // 2, w.idle // 2)

    @cached_property
    def caches(self) -> CacheSpec:
        return cache_spec(
            self.cfg, kv_dtype=self.kv_dtype, state_dtype=self.state_dtype, tp=self.tp,
            speculative_tokens=self.speculative_tokens, mtp=self.speculative_method == "mtp",
        )  # fmt: skip

    def working(self, rows: int) -> int:
        # decode rows ride in the same token budget as a prefill chunk; int8 / int4 prefill
        # dequantizes a matrix at a time into one buffer for its GEMM
        scratch = dequant_buffer_bytes(self.cfg, self.tp) if self.dtype in INT_DTYPES else 0
        return working_memory_bytes(self.cfg, max(self.chunk_tokens, rows), rows,
                                    tp=self.tp) + scratch  # fmt: skip

    def bytes_per_gpu(self, seqs: int, context: int) -> int:
        """Memory one GPU needs to hold `seqs` sequences (of its replica) of `context` tokens."""
        spec = self.caches
        return (
            self.rank_weights.total
            + runtime_overhead_bytes(self.tp)
            + self.working(max(seqs, 1))
            + seqs * (spec.running_state_bytes + context * spec.kv_bytes_per_token)
        )


@dataclass(frozen=True)
class Fit:
    """What a deployment achieves on a GPU. Memory figures are per GPU; counts cover all GPUs."""

    deployment: Deployment
    gpu: GpuSpec
    context: int
    batch: int
    fits: bool  # `batch` sequences of `context` tokens fit
    reason: str  # why not (or "")
    weights: int
    overhead: int
    working: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    max_context: int  # one sequence, capped at the model's max_position_embeddings
    max_context_capped: bool  # the cap, not memory, limits max_context
    max_concurrency: int  # sequences of `context` tokens, all replicas together
    decode_tokens_per_s: float | None  # at `batch` x `context` (None: doesn't fit or no bandwidth)
    decode_tokens_per_s_batch1: float | None

    @property
    def loads(self) -> bool:
        return self.max_context > 0


def max_context(dep: Deployment, capacity: int) -> int:
    """Longest single sequence that fits one replica (0: the model doesn't load)."""
    spec = dep.caches
    free = capacity - dep.bytes_per_gpu(1, 0)
    if free < 0:
        return 0
    if spec.kv_bytes_per_token == 0:
        return dep.cfg.max_position_embeddings
    return min(free // spec.kv_bytes_per_token, dep.cfg.max_position_embeddings)


def max_concurrency(dep: Deployment, capacity: int, context: int) -> int:
    """Most sequences of `context` tokens one replica holds at once (binary search: working
    memory grows with the number of sampled rows)."""
    if dep.bytes_per_gpu(1, context) > capacity:
        return 0
    lo, hi = 1, 2
    while dep.bytes_per_gpu(hi, context) <= capacity:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dep.bytes_per_gpu(mid, context) <= capacity else (lo, mid)
    return lo


def per_replica(dep: Deployment, batch: int) -> int:
    """Sequences the busiest replica holds when `batch` are spread over dp replicas."""
    return -(-batch // dep.dp)


def decode_step_bytes(dep: Deployment, batch: int, context: int) -> float:
    """Bytes the busiest GPU reads in one decode step of `batch` sequences (all replicas) at
    `context` tokens each.

    What a step reads is `plan/decode_bytes.py`'s formula (shared with the benchmarks), with
    the routed experts the step's tokens are expected to touch (E*(1-(1-k/E)^tokens) of E under
    uniform routing).
    """
    touched = moe_touched_fraction(dep.cfg, _routed_tokens(dep, batch))
    return decode_bytes(
        dep.rank_weights,
        dep.caches,
        sequences=per_replica(dep, batch),
        context=context,
        embedding_rows=dep.cfg.vocab_size / dep.tp,  # the vocab-split table's rows on this GPU
        experts_touched=touched,
    ).total


def decode_step_flops(dep: Deployment, batch: int, context: int) -> float:
    """FLOPs the busiest GPU runs in that step: 2 per weight per token, plus QK^T and PV over
    the context in every full-attention layer."""
    cfg, p = dep.cfg, dep.rank_params
    k_frac = cfg.num_experts_per_tok / cfg.num_experts if cfg.is_moe else 1.0
    nh = cfg.num_attention_heads // dep.tp
    attn = 4 * context * nh * cfg.head_dim * cfg.num_full_attention_layers
    b = per_replica(dep, batch)
    return b * (2 * p.dense + attn) + _routed_tokens(dep, batch) * 2 * p.experts * k_frac


def _routed_tokens(dep: Deployment, batch: int) -> int:
    # with expert parallelism every replica's tokens reach the GPU's experts
    return batch if dep.ep_size > 1 else per_replica(dep, batch)


def decode_tokens_per_s(dep: Deployment, gpu: GpuSpec, batch: int, context: int) -> float | None:
    """Roofline decode rate of `batch` sequences (all replicas together; batch 1 = the speed
    one user sees): each step as slow as its bytes over the bandwidth or its FLOPs over the
    dense BF16 peak. Communication and kernel efficiency are ignored: an upper bound (None
    without a bandwidth)."""
    if not gpu.bandwidth_gb_s or batch < 1:
        return None
    step = decode_step_bytes(dep, batch, context) / (gpu.bandwidth_gb_s * 1e9)
    if gpu.bf16_tflops:
        step = max(step, decode_step_flops(dep, batch, context) / (gpu.bf16_tflops * 1e12))
    return batch / step


def fit(dep: Deployment, gpu: GpuSpec, context: int, batch: int = 1) -> Fit:
    cap = gpu.memory_bytes
    spec = dep.caches
    w = dep.rank_weights.total
    mc = max_context(dep, cap)
    conc = max_concurrency(dep, cap, context) if mc else 0
    fits = conc * dep.dp >= batch
    reason = ""
    if not mc:
        need = dep.bytes_per_gpu(1, 0) / GIB
        reason = f"needs {need:.1f} GiB/GPU before any context (has {gpu.memory_gib:g})"
    elif not fits:
        reason = (
            f"holds {conc * dep.dp} sequence(s) of {context:,} tokens, not {batch}"
            if conc
            else f"reaches only {mc:,} tokens"
        )
    return Fit(
        deployment=dep,
        gpu=gpu,
        context=context,
        batch=batch,
        fits=fits,
        reason=reason,
        weights=w,
        overhead=runtime_overhead_bytes(dep.tp),
        working=dep.working(per_replica(dep, batch)),
        kv_bytes_per_token=spec.kv_bytes_per_token,
        state_bytes_per_sequence=spec.running_state_bytes,
        max_context=mc,
        max_context_capped=bool(mc) and mc == dep.cfg.max_position_embeddings,
        max_concurrency=conc * dep.dp,
        decode_tokens_per_s=decode_tokens_per_s(dep, gpu, batch, context) if fits else None,
        decode_tokens_per_s_batch1=decode_tokens_per_s(dep, gpu, 1, context) if mc else None,
    )


def plan_fit(
    cfg: ModelConfig,
    gpu: GpuSpec,
    *,
    dtype: str = "bf16",
    num_gpus: int = 1,
    tp: int | None = None,
    ep: bool = False,
    kv_dtype: str = "bf16",
    state_dtype: str | None = None,
    context: int = DEFAULT_CONTEXT,
    batch: int = 1,
    text_only: bool = False,
    chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
    speculative_tokens: int = 0,
    lora_slots: tuple[int, int] = (0, 0),
    speculative_method: str = "mtp",
    bytes_of: Callable | None = None,
) -> Fit:
    """Fit one model and dtype on `num_gpus` GPUs. Without `tp`, the smallest tensor-parallel
    size (dividing num_gpus, a valid layout) at which it fits; the other GPUs are replicas.
    Raises LayoutError when no layout is possible (or the given `tp` is impossible).
    `speculative_tokens`: drafts a step, from the MTP head (split like the model's layers under
    tensor parallelism) or (`speculative_method` "ngram") by prompt lookup.
    `lora_slots`: (max_loras, max_lora_rank) of LoRA adapters served per request.
    `bytes_of`: the weights as a file stores them (Deployment.bytes_of)."""
    check_request(cfg, dtype, num_gpus, tp, context, batch)
    ep_size = num_gpus if ep and cfg.is_moe else 1
    check_speculative(cfg, speculative_tokens, text_only, speculative_method)
    if tp is not None:
        validate_layout(cfg, tp, ep_size, dtype)  # before the caches are sized for it
        sizes = [tp]
    else:
        sizes = [t for t in range(1, num_gpus + 1) if num_gpus % t == 0]
        valid = [t for t in sizes if not layout_problems(cfg, t, ep_size, dtype)]
        if not valid:  # explain with the full-width layout
            rank_weights(cfg, dtype, num_gpus, ep_size)
        sizes = valid
    best = None
    for t in sizes:
        dep = Deployment(
            cfg, dtype, kv_dtype, state_dtype, t, num_gpus // t, ep, text_only, chunk_tokens,
            speculative_tokens, lora_slots, speculative_method, bytes_of,
        )  # fmt: skip
        best = fit(dep, gpu, context, batch)
        if best.fits:
            break
    assert best is not None
    return best


def context_error(cfg: ModelConfig, context: int) -> str:
    """Why `context` tokens don't fit the model's positions, and what extends them (YaRN)."""
    if context < 1:
        return f"--context must be at least 1, got {context:,}"
    top = cfg.max_position_embeddings
    limit = f"{top:,} tokens with" if cfg.yarn is not None else f"native {top:,} tokens;"
    return f"--context {context:,} exceeds {cfg.name}'s {limit} {cfg.yarn_advice(context)}"


def check_request(
    cfg: ModelConfig, dtype: str, num_gpus: int, tp: int | None, context: int, batch: int
) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise PlanError(f"--dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if num_gpus < 1:
        raise PlanError(f"--num-gpus must be at least 1, got {num_gpus}")
    if tp is not None and (tp < 1 or num_gpus % tp):
        raise PlanError(f"--tp {tp} must be >= 1 and divide --num-gpus {num_gpus}")
    if not 1 <= context <= cfg.max_position_embeddings:
        raise PlanError(context_error(cfg, context))
    if batch < 1:
        raise PlanError(f"--batch must be at least 1, got {batch}")


def check_speculative(cfg: ModelConfig, tokens: int, text_only: bool, method: str = "mtp") -> None:
    """MTP drafts need the MTP head (loaded: not text-only), n-gram ones nothing."""
    if method not in SPECULATIVE_METHODS:
        raise PlanError(
            f"--speculative-method takes {' or '.join(SPECULATIVE_METHODS)}, got {method!r}"
        )
    if tokens not in range(MAX_SPECULATIVE_TOKENS + 1):
        raise PlanError(
            f"--num-speculative-tokens takes 0 .. {MAX_SPECULATIVE_TOKENS} (drafts a step), "
            f"got {tokens}"
        )
    if not tokens:
        return
    if method == "mtp" and not cfg.mtp_num_hidden_layers:
        raise PlanError(
            f"{cfg.name} has no MTP head to draft with; drop --num-speculative-tokens, or draft "
            "by prompt lookup (--speculative-method ngram)"
        )
    if method == "mtp" and text_only:
        raise PlanError(
            "--num-speculative-tokens drafts with the MTP head, which --text-only leaves out; "
            "drop one of them, or draft by prompt lookup (--speculative-method ngram)"
        )


# ---- model summaries and recommendations ---------------------------------------------------


@dataclass(frozen=True)
class ModelSummary:
    """A model's sizes independent of any GPU (KV and state at tp=1)."""

    cfg: ModelConfig
    params: ParamCounts
    weights_bytes: dict[str, int | None]  # full checkpoint; "fp8": None without an FP8 release
    weights_bytes_text_only: dict[str, int | None]
    kv_bytes_per_token: int
    state_bytes_per_sequence: int


def summarize(
    cfg: ModelConfig,
    kv_dtype: str = "bf16",
    state_dtype: str | None = None,
    speculative_tokens: int = 0,
    speculative_method: str = "mtp",
) -> ModelSummary:
    fp8 = has_fp8(cfg)
    spec = cache_spec(
        cfg, kv_dtype=kv_dtype, state_dtype=state_dtype, speculative_tokens=speculative_tokens,
        mtp=speculative_method == "mtp",
    )  # fmt: skip

    def sizes(text_only: bool) -> dict[str, int | None]:
        return {
            "bf16": weight_bytes(cfg, "bf16", text_only),
            "fp8": weight_bytes(cfg, "fp8", text_only) if fp8 else None,
        }

    return ModelSummary(
        cfg=cfg,
        params=param_counts(cfg),
        weights_bytes=sizes(False),
        weights_bytes_text_only=sizes(True),
        kv_bytes_per_token=spec.kv_bytes_per_token,
        state_bytes_per_sequence=spec.running_state_bytes,
    )


@dataclass(frozen=True)
class Recommendation:
    fit: Fit
    why: str


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else f"{tokens:,}"


def _size(f: Fit) -> int:
    return param_counts(f.deployment.cfg).total


def recommend(fits: list[Fit]) -> Recommendation | None:
    """The largest model (most parameters: the most knowledge) that serves `batch` sequences
    of `context` tokens; BF16 before FP8 of the same model. None when nothing fits."""
    ok = [f for f in fits if f.fits]
    if not ok:
        return None
    best = max(ok, key=lambda f: (_size(f), f.deployment.dtype == "bf16"))
    want = _k(best.context) + (f" x {best.batch}" if best.batch > 1 else "")
    why = (
        f"largest to serve {want}: {best.weights / GIB:.1f} GiB weights/GPU, "
        f"{best.max_concurrency:,} such sequences"
    )
    if best.decode_tokens_per_s_batch1:
        why += f", ~{best.decode_tokens_per_s_batch1:,.0f} tok/s"
    bigger = [f for f in fits if _size(f) > _size(best)]
    if bigger:
        nxt = min(bigger, key=lambda f: (_size(f), -f.max_context, f.weights))
        name = f"{nxt.deployment.cfg.name.removeprefix('Qwen3.5-')} {nxt.deployment.dtype.upper()}"
        why += f"; {name} {nxt.reason}"
    return Recommendation(best, why)


__all__ = [
    "ACTIVATION_FACTOR",
    "DEFAULT_CONTEXT",
    "DEFAULT_PREFILL_CHUNK",
    "GIB",
    "Deployment",
    "Fit",
    "LayoutError",
    "ModelSummary",
    "Recommendation",
    "PlanError",
    "check_request",
    "check_speculative",
    "decode_step_bytes",
    "per_replica",
    "decode_step_flops",
    "decode_tokens_per_s",
    "fit",
    "max_concurrency",
    "max_context",
    "moe_touched_fraction",
    "plan_fit",
    "recommend",
    "summarize",
    "runtime_overhead_bytes",
    "working_memory_bytes",
]
