"""The contract between the model runner and the model: what one engine step computes.

A step runs T new tokens from B sequences, flattened: sequence i owns token rows
`cu_seqlens[i]:cu_seqlens[i+1]`. Prefill chunks and decode tokens travel in the same batch.

Caches live outside the model in `ModelCaches` (allocated once by the engine from `cache_spec`):
- full-attention layers: paged K and V, `[num_blocks, block_size, num_kv_heads, head_dim]`;
  token t of sequence i is stored at flat slot `slot_mapping[t]` = block * block_size + offset.
- Gated DeltaNet layers: per-slot conv state `[num_slots, C, kernel-1]` (model dtype) and
  recurrent state `[num_slots, nv, dk, dv]` (fp32 by default). Sequence i reads and writes slot
  `state_slots[i]`; when it has no initial state it starts from zeros.

`ForwardBatch.build(...)` is called by the runner (and by tests and the uncached path) with the
step's host-side lists. Everything the model needs is prepared there, once per step: index
tensors on the device, and the few host ints the per-sequence prefill loop needs. The model
never reads a device tensor back to the host (no `.tolist()`, no `.item()`), so a decode step
(`ForwardBatch.decode` alone) is a fixed sequence of kernels that a CUDA graph can capture.

Rows with one new token are decode rows (`DecodeBatch`: tensors only, plus CPU-only host
extras); rows with more are prefill chunks (`SeqPlan`, one per sequence, host ints).
The `backend` (ops/backend.py) is chosen once per engine and travels with every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch

from qwen35.cache_spec import cache_spec
from qwen35.config import ModelConfig
from qwen35.heap import zeros_on_touch
from qwen35.ops.backend import Backend, select_backend
from qwen35.ops.deltanet import copy_layer_states


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

    def copy_states(self, pairs: Sequence[tuple[int, int]]) -> None:
        """For each (src, dst): DeltaNet conv + recurrent state of slot src -> slot dst."""
        for conv, rec in zip(self.conv, self.recurrent, strict=False):
            copy_layer_states(conv, rec, pairs)





def allocate_caches(
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int,
    num_slots: int,
    dtype: torch.dtype,
    device: torch.device | str,
    state_dtype: torch.dtype = torch.float32,
    tp: int = 1,
    mtp_layers: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> ModelCaches:
    """Zeroed caches: KV [num_blocks, block_size, nkv, hd] per full-attention layer (kv_dtype,
    default dtype),
    conv [num_slots, C, kernel-1] (dtype) and recurrent [num_slots, nv, dk, dv] (state_dtype)
    per DeltaNet layer. Zeros, not empty: padded gathers must never read NaN garbage.
    tp > 1: one tensor-parallel rank's shard (its KV heads, DeltaNet heads and conv channels).
    mtp_layers: KV for the MTP head's attention layers too (after the main model's)."""
    spec = cache_spec(cfg, tp=tp)
    kv_shape = (num_blocks, block_size, spec.attention.num_kv_heads, spec.attention.head_dim)
    n_attn, n_lin = spec.num_attention_layers + mtp_layers, spec.num_linear_layers

    def zeros(shape, dt):
        if torch.device(device).type == "cpu":  # (pages zeroed by the OS as they are first used)
            return zeros_on_touch(shape, dt)
        return torch.zeros(shape, dtype=dt, device=device)

    return ModelCaches(
        key=[zeros(kv_shape, kv_dtype or dtype) for _ in range(n_attn)],
        value=[zeros(kv_shape, kv_dtype or dtype) for _ in range(n_attn)],
        conv=[zeros((num_slots, *spec.linear.conv_shape), dtype) for _ in range(n_lin)],
        recurrent=[
            zeros((num_slots, *spec.linear.recurrent_shape), state_dtype) for _ in range(n_lin)
        ],
        block_size=block_size,
    )


@dataclass
class SeqPlan:
    """One multi-token sequence of the step (a prefill chunk): host ints."""

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
class DecodeBatch:
    """All single-token sequences of the step, processed together. The tensors are all a
    decode step reads on a GPU (and all a CUDA graph holds as static inputs)."""

    rows: torch.Tensor  # [N] int64 token rows of the decode tokens
    block_tables: torch.Tensor  # [N, max_blocks] int32
    context_lens: torch.Tensor  # [N] int32, tokens to attend (the new one included)
    state_slots: torch.Tensor  # [N] int64 DeltaNet state slot of each row
    max_context: int  # max of context_lens (host int; the gathering CPU path's width)
    # every row of the step is a decode row, rows == 0..N-1: no gather/scatter of rows
    all_rows: bool = False
    # slots of rows without an initial state: zeroed before the step (None: none)
    fresh_slots: torch.Tensor | None = None
    # CPU path: the same rows ordered by state slot, and runs of consecutive slots in that
    # order (first position, first slot, count): DeltaNet layers update each run's states in
    # place on a cache view instead of gathering and scattering [N, nv, dk, dv] every layer.
    rows_by_slot: torch.Tensor | None = None  # [N] int64 token rows, slot-ascending
    slot_runs: list[tuple[int, int, int]] = field(default_factory=list)
    all_rows_in_slot_order: bool = False  # rows_by_slot is exactly 0..T-1
    # Speculative verify steps (engine/speculative.py): the DeltaNet layers step the rows in
    # phases, each a DecodeBatch over a contiguous row range (`row_range`; CPU, `in_slot_order`:
    # its rows_by_slot is that range), each later phase's rows one token after rows of the
    # phase before in the same slots; after phase j (all but the last) each layer copies the
    # states `phase_copies[j]` (src, dst). Attention and the projections take every row at
    # once (per-row context lengths).
    # On a GPU (and in CUDA graphs) the phases are the same row ranges, each with its state
    # slots, and each phase but the last carries its copies as one tensor `copies_after`
    # [2, m] (src slots, dst slots) that the DeltaNet layers apply by index (no host lists).
    phases: list[DecodeBatch] | None = None
    phase_copies: list[list[tuple[int, int]]] = field(default_factory=list)
    row_range: tuple[int, int] = (0, 0)
    in_slot_order: bool = False
    copies_after: torch.Tensor | None = None
    # False: max_context only bounds context_lens (a CUDA graph's buffers, whatever they hold)
    max_context_exact: bool = True


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    logits_indices: torch.Tensor  # [S] int64, token rows whose logits are returned
    prefill: list[SeqPlan]
    decode: DecodeBatch | None
    backend: Backend
    # After the step: DeltaNet state of slot src copied to dest (prefix-cache checkpoints of
    # decode rows; the model applies them at the end of its forward, a graph runner after replay)
    state_copies: list[tuple[int, int]] = field(default_factory=list)
    # Images / videos (set by the runner, engine/vision_inputs.py): 3-D rotary positions [3, T]
    # (t, h, w streams; None: 1-D `positions`), and vision-encoder rows [M, H] that replace the
    # embeddings of token rows mm_rows [M].
    mrope_positions: torch.Tensor | None = None
    mm_rows: torch.Tensor | None = None
    mm_embeds: torch.Tensor | None = None
    # the step's token ids [T] when build() was given them (sent with the other index tensors)
    input_ids: torch.Tensor | None = None
    # LoRA adapters (set by the runner, layers/lora.py): per adapter, [(adapter id, its rows
    # [n] int64, or None for every row)] of the rows that run with one; stacked, each row's
    # adapter slot [T] int64 (0: none); None when no row runs with one
    lora: list[tuple[int, torch.Tensor | None]] | None = None
    lora_slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @classmethod
    def build(
        cls,
        *,
        positions: Sequence[int] | torch.Tensor,
        cu_seqlens: Sequence[int],
        context_lens: Sequence[int],
        slot_mapping: Sequence[int] | torch.Tensor,
        block_tables: torch.Tensor | Sequence[Sequence[int]],
        state_slots: Sequence[int] | torch.Tensor,
        has_initial_state: Sequence[bool],
        logits_indices: Sequence[int] | torch.Tensor,
        state_checkpoints: Sequence[tuple[int, int, int]] = (),
        device: torch.device | str | None = None,
        backend: Backend | None = None,
        input_ids: Sequence[int] | None = None,
        phase_splits: Sequence[int] = (),
        phase_copies: Sequence[Sequence[tuple[int, int]]] = (),
    ) -> ForwardBatch:
        """From host lists (tensors are accepted too; they are read on the host here, in the
        runner, never in the model). `state_checkpoints`: (i, n, dest) = after the first n new
        tokens of sequence i copy its DeltaNet state into slot dest (1 <= n <= its tokens).
        phase_splits (every sequence one token): the entries from each of these indices on
        are the next tokens of entries of the phase before (the same state slots), run after
        them in DeltaNet layers, with `phase_copies[j]` (src, dst) of each layer's states after
        phase j (DecodeBatch.phases; a CPU backend's phases by slot runs, another's by row
        range with their copies as tensors)."""
        cu = [int(c) for c in cu_seqlens]
        B = len(cu) - 1
        T = cu[-1] if cu else 0
        host = _host_ints
        slots, ctx = host(state_slots), host(context_lens)
        if cu[0] != 0 or any(cu[j + 1] < cu[j] for j in range(B)):
            raise ValueError(f"cu_seqlens {cu} must rise from 0 to the number of input tokens")
        if len(ctx) != B or len(has_initial_state) != B or len(slots) != B:
            raise ValueError(
                "context_lens, state_slots and has_initial_state need one entry per sequence"
            )
        if device is None:
            device = (
                positions.device if isinstance(positions, torch.Tensor) else torch.device("cpu")
            )
        device = torch.device(device)
        backend = backend or select_backend(device)
        cps: dict[int, list[tuple[int, int]]] = {}
        for i, n, dest in state_checkpoints:
            if not (0 <= i < B and 1 <= n <= cu[i + 1] - cu[i]):
                raise ValueError(f"state checkpoint {(i, n, dest)} is outside sequence {i}")
            cps.setdefault(i, []).append((n, dest))

        up = _Upload(device)

        def dev_tensor(x, dtype):
            if isinstance(x, torch.Tensor):
                return x.to(device=device, dtype=dtype)
            return up.add(torch.tensor(list(x), dtype=dtype))

        host_table = None
        if isinstance(block_tables, torch.Tensor):
            table = block_tables.to(device=device, dtype=torch.int32)
        else:
            width = max((len(t) for t in block_tables), default=1) or 1
            rows = np.zeros((len(block_tables), width), dtype=np.int32)
            for i, t in enumerate(block_tables):  # (lists or int32 arrays: numpy copies either
                if len(t):  # row in well under a microsecond; torch's indexing costs several)
                    rows[i, : len(t)] = t
            host_table = torch.from_numpy(rows)
            table = up.add(host_table)

        prefill, dec = [], []
        for i in range(B):
            n = cu[i + 1] - cu[i]
            if n == 0:
                continue
            if ctx[i] - n < 0:
                raise ValueError(f"context_lens[{i}] is smaller than its {n} new tokens")
            if n == 1:
                dec.append(i)
                continue
            sp = SeqPlan(i, cu[i], n, ctx[i] - n, slots[i], bool(has_initial_state[i]))
            sp.checkpoints = sorted(cps.get(i, []))
            prefill.append(sp)
        decode = None
        copies: list[tuple[int, int]] = []
        if dec:
            copies = [(slots[i], dest) for i in dec for _, dest in cps.get(i, [])]
            rows = [cu[i] for i in dec]
            dslots = [slots[i] for i in dec]
            fresh = [slots[i] for i in dec if not has_initial_state[i]]
            all_rows = rows == list(range(T))
            if all_rows:
                dec_table = table
            elif host_table is not None:
                dec_table = up.add(host_table[dec])
            else:
                dec_table = table.index_select(0, torch.tensor(dec, device=device))
            decode = DecodeBatch(
                rows=up.add(torch.tensor(rows, dtype=torch.long)),
                block_tables=dec_table,
                context_lens=up.add(torch.tensor([ctx[i] for i in dec], dtype=torch.int32)),
                state_slots=up.add(torch.tensor(dslots, dtype=torch.long)),
                max_context=max(ctx[i] for i in dec),
                all_rows=all_rows,
                fresh_slots=up.add(torch.tensor(fresh, dtype=torch.long)) if fresh else None,
            )
            if phase_splits:
                bounds = [0, *phase_splits, B]
                if (prefill or len(dec) != B or any(a >= b for a, b in pairwise(bounds))
                        or len(phase_copies) != len(phase_splits)):  # fmt: skip
                    raise ValueError(
                        "phase_splits need one token per sequence, rising splits inside the "
                        "batch and one list of copies per split"
                    )
                decode.phase_copies = [list(c) for c in phase_copies]
                if backend.device_type == "cpu":
                    decode.phases = [
                        _slot_order(DecodeBatch(None, None, None, None, 0), up, rows[a:b],
                                    dslots[a:b], T)  # fmt: skip
                        for a, b in pairwise(bounds)
                    ]
                else:
                    decode.phases = _row_phases(up, bounds, dslots, decode.phase_copies)
            elif backend.device_type == "cpu":
                _slot_order(decode, up, rows, dslots, T)
        batch = cls(
            positions=dev_tensor(positions, torch.long),
            slot_mapping=dev_tensor(slot_mapping, torch.long),
            block_tables=table,
            logits_indices=dev_tensor(logits_indices, torch.long),
            prefill=prefill,
            decode=decode,
            backend=backend,
            state_copies=copies,
            input_ids=None if input_ids is None else dev_tensor(input_ids, torch.long),
        )
        up.send(batch)
        return batch


def _row_phases(up, bounds: list[int], slots: list[int], copies) -> list[DecodeBatch]:
    """A GPU backend's phases (rows in phase order, one decode row per sequence and phase):
    each phase's row range and state slots, and the copies after it as a [2, m] tensor."""
    out = []
    for j, (a, b) in enumerate(pairwise(bounds)):
        p = DecodeBatch(
            rows=up.add(torch.arange(a, b)),
            block_tables=None,
            context_lens=None,
            state_slots=up.add(torch.tensor(slots[a:b], dtype=torch.long)),
            max_context=0,
            row_range=(a, b),
        )
        if j < len(copies) and copies[j]:
            p.copies_after = up.add(torch.tensor(copies[j], dtype=torch.long).T.contiguous())
        out.append(p)
    return out


def _slot_order(d: DecodeBatch, up, rows: list[int], slots: list[int], T: int) -> DecodeBatch:
    """The CPU fields of d: its rows by state slot, runs of consecutive slots, row range."""
    by_slot = sorted(range(len(rows)), key=lambda j: slots[j])
    rows_by_slot = [rows[j] for j in by_slot]
    d.rows_by_slot = up.add(torch.tensor(rows_by_slot))
    d.slot_runs = consecutive_runs([slots[j] for j in by_slot])
    d.all_rows_in_slot_order = rows_by_slot == list(range(T))
    d.row_range = (min(rows), max(rows) + 1)
    d.in_slot_order = rows_by_slot == list(range(*d.row_range))
    return d


class _Upload:
    """The step's index tensors, built on the host, sent to the device in one copy per dtype.

    On a GPU each `torch.tensor(list, device=cuda)` is a synchronous copy from pageable memory
    (tens of microseconds with its Python around it), and a step builds about eight of them:
    here they are concatenated on the host and sent once per dtype, each field a view of the
    device buffer. `add(host)` returns a placeholder; `send(batch)` replaces every placeholder
    among the batch's (and its DecodeBatch's) fields with its device view. On a CPU the host
    tensors are the result as they are.
    On CUDA the buffer goes through pinned memory with a non-blocking copy: a blocking copy
    from pageable memory waits for the stream, i.e. for every step queued before it, which
    would stall multi-step decoding's host (it builds step j + 1 while step j runs). torch's
    pinned-memory cache keeps the host block until the copy is done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: list[torch.Tensor] = []

    def add(self, host: torch.Tensor):
        if self.device.type == "cpu":
            return host
        self.host.append(host)
        return _Pending(len(self.host) - 1)

    def send(self, batch: ForwardBatch) -> None:
        if not self.host:
            return
        views: list[torch.Tensor | None] = [None] * len(self.host)
        for dtype in {t.dtype for t in self.host}:
            idx = [i for i, t in enumerate(self.host) if t.dtype == dtype]
            flat = send_to_device(torch.cat([self.host[i].reshape(-1) for i in idx]), self.device)
            parts = flat.split([self.host[i].numel() for i in idx])
            for i, part in zip(idx, parts, strict=True):
                views[i] = part.view(self.host[i].shape)
        phases = batch.decode.phases or [] if batch.decode is not None else []
        for obj in (batch, batch.decode, *phases):
            if obj is None:
                continue
            for name, value in vars(obj).items():
                if isinstance(value, _Pending):
                    setattr(obj, name, views[value.index])


_PINNED = [True]  # False once pinning failed in this process (e.g. a locked-memory limit)


def send_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """host -> device without waiting for the device's stream (CUDA: through pinned memory)."""
    if device.type == "cuda" and _PINNED[0]:
        try:
            return host.pin_memory().to(device, non_blocking=True)
        except RuntimeError:  # no pinned memory to be had: the blocking copy
            _PINNED[0] = False
    return host.to(device)


@dataclass(frozen=True)
class _Pending:
    index: int


def _host_ints(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


def consecutive_runs(values: list[int]) -> list[tuple[int, int, int]]:
    """Ascending ints -> runs of consecutive values: (first position, first value, count)."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((start, values[start], i - start))
            start = i
    return runs
