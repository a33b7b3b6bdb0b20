"""The contract between the model runner and the model: what one engine step computes.

A step runs T new tokens from B sequences, flattened: sequence i owns token rows
`cu_seqlens[i]:cu_seqlens[i+1]`. Prefill chunks and decode tokens travel in the same batch.

Caches live outside the model in `ModelCaches` (allocated once by the engine from `cache_spec`):
- full-attention layers: paged K and V, `[num_blocks, block_size, num_kv_heads, head_dim]`;
  token t of sequence i is stored at flat slot `slot_mapping[t]` = block * block_size + offset.
- Gated DeltaNet layers: per-slot conv state `[num_slots, C, kernel-1]` (model dtype) and
  recurrent state `[num_slots, nv, dk, dv]` (fp32 by default). Sequence i reads and writes slot
  `state_slots[i]`; when `has_initial_state[i]` is False it starts from zeros.

Cache allocation from `cache_spec` (the one formula) and the per-step plan the layers follow.

`allocate_caches` builds the `ModelCaches` the runner hands to the model; the shapes come from
`qwen35.cache_spec.cache_spec`, which the planner also uses, so planned bytes are allocated bytes.

`StepPlan.build(batch)` turns a `ForwardBatch` into index lists once per forward, so every
layer reuses them: multi-token sequences (prefill chunks) are processed one by one, the
single-token sequences (decode) together in one vectorised path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen35.cache_spec import cache_spec
from qwen35.config import ModelConfig


@dataclass
class ModelCaches:
    key: list[torch.Tensor]  # per full-attention layer: [num_blocks, block_size, nkv, hd]
    value: list[torch.Tensor]  # same
    conv: list[torch.Tensor]  # per DeltaNet layer: [num_slots, C, kernel-1]
    recurrent: list[torch.Tensor]  # per DeltaNet layer: [num_slots, nv, dk, dv]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.key[0].shape[0] if self.key else 0

    @property
    def num_slots(self) -> int:
        return self.conv[0].shape[0] if self.conv else 0


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    cu_seqlens: list[int]  # [B+1] query boundaries in the flat token batch
    context_lens: list[int]  # [B] tokens in the KV cache after this step (start + new)
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    state_slots: torch.Tensor  # [B] int64, DeltaNet state slot of each sequence
    has_initial_state: list[bool]  # [B] False: the sequence starts at position 0, state = zeros
    logits_indices: torch.Tensor  # [S] int64, token rows whose logits are returned
    # Prefix caching: after the first `n` new tokens of sequence i, copy its DeltaNet state
    # (conv + recurrent) into slot `dest`: entries (i, n, dest), 1 <= n <= new tokens of i.
    state_checkpoints: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    def seq_len(self, i: int) -> int:
        return self.cu_seqlens[i + 1] - self.cu_seqlens[i]

    def start_pos(self, i: int) -> int:
        return self.context_lens[i] - self.seq_len(i)


def allocate_caches(
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int,
    num_slots: int,
    dtype: torch.dtype,
    device: torch.device | str,
    state_dtype: torch.dtype = torch.float32,
) -> ModelCaches:
    """Zeroed caches: KV [num_blocks, block_size, nkv, hd] per full-attention layer (dtype),
    conv [num_slots, C, kernel-1] (dtype) and recurrent [num_slots, nv, dk, dv] (state_dtype)
    per DeltaNet layer. Zeros, not empty: padded gathers must never read NaN garbage."""
    spec = cache_spec(cfg)
    kv_shape = (num_blocks, block_size, spec.attention.num_kv_heads, spec.attention.head_dim)
    n_attn, n_lin = spec.num_attention_layers, spec.num_linear_layers

    def zeros(shape, dt):
        return torch.zeros(shape, dtype=dt, device=device)

    return ModelCaches(
        key=[zeros(kv_shape, dtype) for _ in range(n_attn)],
        value=[zeros(kv_shape, dtype) for _ in range(n_attn)],
        conv=[zeros((num_slots, *spec.linear.conv_shape), dtype) for _ in range(n_lin)],
        recurrent=[
            zeros((num_slots, *spec.linear.recurrent_shape), state_dtype) for _ in range(n_lin)
        ],
        block_size=block_size,
    )


@dataclass
class SeqPlan:
    """One multi-token sequence of the step (a prefill chunk)."""

    index: int  # sequence number in the batch
    row0: int  # first token row in the flat batch
    num_tokens: int  # new tokens this step
    start_pos: int  # tokens already in the cache before this step
    slot: int  # DeltaNet state slot
    has_initial_state: bool
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (n, dest slot), sorted

    @property
    def rows(self) -> slice:
        return slice(self.row0, self.row0 + self.num_tokens)

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass
class DecodePlan:
    """All single-token sequences of the step, processed together."""

    rows: torch.Tensor  # [N] int64 token rows
    block_tables: torch.Tensor  # [N, max_blocks] int
    context_lens: torch.Tensor  # [N] int64
    max_context: int
    checkpoints: list[tuple[int, int]]  # (state slot, dest slot): copy after the step
    # The same sequences ordered by state slot, and runs of consecutive slots in that order
    # (first position, first slot, count): DeltaNet layers update each run's states in place on
    # a cache view instead of gathering and scattering [N, nv, dk, dv] every layer.
    rows_by_slot: torch.Tensor | None = None  # [N] int64 token rows, slot-ascending
    # [N] bool in that order, True = no initial state (start from zeros); None: none fresh
    fresh_by_slot: torch.Tensor | None = None
    slot_runs: list[tuple[int, int, int]] = field(default_factory=list)
    # rows_by_slot is exactly 0..T-1: every row of the step is a decode row, already in slot
    # order (batch-1 decode; batches whose sequences sit in ascending slots): no gather
    all_rows_in_slot_order: bool = False


@dataclass
class StepPlan:
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks]
    prefill: list[SeqPlan]
    decode: DecodePlan | None

    @classmethod
    def build(cls, batch: ForwardBatch, num_tokens: int) -> StepPlan:
        B = batch.num_seqs
        cu = batch.cu_seqlens
        if cu[0] != 0 or cu[-1] != num_tokens or any(cu[j + 1] < cu[j] for j in range(B)):
            raise ValueError(
                f"cu_seqlens {cu} must rise from 0 to the number of input tokens ({num_tokens})"
            )
        if len(batch.context_lens) != B or len(batch.has_initial_state) != B:
            raise ValueError("context_lens and has_initial_state need one entry per sequence")
        cps: dict[int, list[tuple[int, int]]] = {}
        for i, n, dest in batch.state_checkpoints:
            if not (0 <= i < B and 1 <= n <= batch.seq_len(i)):
                raise ValueError(f"state checkpoint {(i, n, dest)} is outside sequence {i}")
            cps.setdefault(i, []).append((n, dest))
        slots = batch.state_slots.tolist()
        prefill, dec_idx = [], []
        for i in range(B):
            n = batch.seq_len(i)
            if n == 0:
                continue
            if batch.start_pos(i) < 0:
                raise ValueError(f"context_lens[{i}] is smaller than its {n} new tokens")
            if n == 1:
                dec_idx.append(i)
                continue
            sp = SeqPlan(i, cu[i], n, batch.start_pos(i), slots[i], batch.has_initial_state[i])
            sp.checkpoints = sorted(cps.get(i, []))
            prefill.append(sp)
        decode = None
        if dec_idx:
            dev = batch.slot_mapping.device
            idx = torch.tensor(dec_idx, device=dev)
            fresh = [not batch.has_initial_state[i] for i in dec_idx]
            ctx = [batch.context_lens[i] for i in dec_idx]
            by_slot = sorted(range(len(dec_idx)), key=lambda j: slots[dec_idx[j]])
            rows_by_slot = [cu[dec_idx[j]] for j in by_slot]
            decode = DecodePlan(
                rows=torch.tensor([cu[i] for i in dec_idx], device=dev),
                block_tables=batch.block_tables.index_select(0, idx),
                context_lens=torch.tensor(ctx, device=dev),
                max_context=max(ctx),
                checkpoints=[(slots[i], dest) for i in dec_idx for _, dest in cps.get(i, [])],
                rows_by_slot=torch.tensor(rows_by_slot, device=dev),
                fresh_by_slot=torch.tensor([fresh[j] for j in by_slot], device=dev)
                if any(fresh)
                else None,
                slot_runs=consecutive_runs([slots[dec_idx[j]] for j in by_slot]),
                all_rows_in_slot_order=rows_by_slot == list(range(num_tokens)),
            )
        return cls(batch.slot_mapping, batch.block_tables, prefill, decode)


def consecutive_runs(values: list[int]) -> list[tuple[int, int, int]]:
    """Ascending ints -> runs of consecutive values: (first position, first value, count)."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((start, values[start], i - start))
            start = i
    return runs
