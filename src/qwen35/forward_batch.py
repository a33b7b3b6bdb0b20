"""The contract between the model runner and the model: what one engine step computes.

A step runs T new tokens from B sequences, flattened: sequence i owns token rows
`cu_seqlens[i]:cu_seqlens[i+1]`. Prefill chunks and decode tokens travel in the same batch.

Caches live outside the model in `ModelCaches` (allocated by the runner from `cache_spec`):
- full-attention layers: paged K and V, `[num_blocks, block_size, num_kv_heads, head_dim]`;
  token t of sequence i is stored at flat slot `slot_mapping[t]` = block * block_size + offset.
- Gated DeltaNet layers: per-slot conv state `[num_slots, C, kernel-1]` (model dtype) and
  recurrent state `[num_slots, nv, dk, dv]` (fp32 by default). Sequence i reads and writes slot
  `state_slots[i]`; when `has_initial_state[i]` is False it starts from zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
