"""What the model's caches hold, per layer kind: the one formula the engine allocates with and
the planner sizes memory with.

- Gated full-attention layers keep K and V for every token: [num_kv_heads, head_dim] each.
- Gated DeltaNet layers keep, per sequence, a conv state (the last `kernel - 1` pre-conv inputs
  of the C = 2*Kd + Vd conv channels) and a recurrent state S of [num_v_heads, dk, dv].

Under tensor parallelism the DeltaNet heads and conv channels are split; the KV heads are split
while tp <= num_kv_heads and replicated (one head per rank) beyond. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen35.config import ModelConfig

DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "float8_e4m3fn": 1,
}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class AttentionCacheSpec:
    """One gated full-attention layer, one rank: K and V per token."""

    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class LinearStateSpec:
    """One Gated DeltaNet layer, one rank, one sequence: conv state + recurrent state."""

    conv_shape: tuple[int, int]  # [conv channels, kernel - 1]
    conv_dtype: str
    recurrent_shape: tuple[int, int, int]  # [num_v_heads, dk, dv]
    recurrent_dtype: str

    @property
    def conv_bytes(self) -> int:
        c, k = self.conv_shape
        return c * k * dtype_bytes(self.conv_dtype)

    @property
    def recurrent_bytes(self) -> int:
        h, dk, dv = self.recurrent_shape
        return h * dk * dv * dtype_bytes(self.recurrent_dtype)

    @property
    def bytes_per_sequence(self) -> int:
        return self.conv_bytes + self.recurrent_bytes


# MTP drafts per decode step at most (`--num-speculative-tokens`; vLLM accepts 1..5 for Qwen 3.5)
MAX_SPECULATIVE_TOKENS = 5
# where drafts come from (`--speculative-method`): the MTP head (its own KV layer), or prompt
# lookup ("ngram": no model, no cache of its own)
SPECULATIVE_METHODS = ("mtp", "ngram")


@dataclass(frozen=True)
class CacheSpec:
    layer_types: tuple[str, ...]
    attention: AttentionCacheSpec
    linear: LinearStateSpec
    tp: int = 1
    # speculative decoding with the MTP head (engine/speculative.py): its attention layer keeps
    # K and V for every token like the model's own, and every running sequence has a spare
    # DeltaNet state per draft (the state before it, restored when it is rejected)
    mtp_layers: int = 0
    spare_states: int = 0

    @property
    def num_attention_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def num_linear_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def kv_bytes_per_token(self) -> int:
        """Per rank: K + V of every full-attention layer (and the MTP head's) for one token."""
        return (self.num_attention_layers + self.mtp_layers) * self.attention.bytes_per_token

    @property
    def state_bytes_per_sequence(self) -> int:
        """Per rank: conv + recurrent state of every DeltaNet layer for one sequence (what a
        state slot and a prefix-cache checkpoint hold)."""
        return self.num_linear_layers * self.linear.bytes_per_sequence

    @property
    def running_state_bytes(self) -> int:
        """Per rank: the states a running sequence holds (its slot and any spare)."""
        return (1 + self.spare_states) * self.state_bytes_per_sequence


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads split while tp <= num_kv_heads, replicated (1 per rank) beyond."""
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ValueError(f"tp={tp} does not divide the {num_kv_heads} KV heads")
        return num_kv_heads // tp
    if tp % num_kv_heads:
        raise ValueError(f"tp={tp} is not a multiple of the {num_kv_heads} KV heads to replicate")
    return 1


def cache_spec(
    cfg: ModelConfig,
    *,
    kv_dtype: str = "bf16",
    state_dtype: str | None = None,
    conv_dtype: str = "bf16",
    tp: int = 1,
    speculative_tokens: int = 0,
    mtp: bool = True,
) -> CacheSpec:
    """The model's cache declaration. `state_dtype` defaults to the config's mamba_ssm_dtype (fp32).
    `speculative_tokens`: drafts per step (0 .. MAX_SPECULATIVE_TOKENS), which add a spare state
    per draft and sequence, and with `mtp` (drafts from the MTP head, not n-gram lookup) the
    head's KV layers."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if speculative_tokens not in range(MAX_SPECULATIVE_TOKENS + 1):
        raise ValueError(
            f"speculative_tokens must be 0 .. {MAX_SPECULATIVE_TOKENS}, got {speculative_tokens}"
        )
    if speculative_tokens and mtp and not cfg.mtp_num_hidden_layers:
        raise ValueError(f"{cfg.name} has no MTP head (mtp_num_hidden_layers = 0) to draft with")
    state_dtype = state_dtype or cfg.mamba_ssm_dtype
    for d in (kv_dtype, state_dtype, conv_dtype):
        dtype_bytes(d)
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if nk % tp or nv % tp:
        raise ValueError(
            f"tp={tp} must divide the DeltaNet key heads ({nk}) and value heads ({nv})"
        )
    attn = AttentionCacheSpec(
        kv_heads_per_rank(cfg.num_key_value_heads, tp), cfg.head_dim, kv_dtype
    )
    lin = LinearStateSpec(
        conv_shape=(cfg.linear_conv_dim // tp, cfg.linear_conv_kernel_dim - 1),
        conv_dtype=conv_dtype,
        recurrent_shape=(nv // tp, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
        recurrent_dtype=state_dtype,
    )
    return CacheSpec(
        layer_types=cfg.layer_types, attention=attn, linear=lin, tp=tp,
        mtp_layers=cfg.mtp_num_hidden_layers if speculative_tokens and mtp else 0,
        spare_states=speculative_tokens,
    )  # fmt: skip
