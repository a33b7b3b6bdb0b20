"""Slot pool for the Gated DeltaNet layers' state (conv + recurrent), plus prefix-cache checkpoints.

The runner allocates ONE tensor pool per DeltaNet layer with `total_slots` rows; this class hands
out indices into it and never touches tensors:
- running slots     0 .. num_slots-1: one per running sequence (admission needs one);
- checkpoint slots  num_slots .. num_slots+num_checkpoint_slots-1: copies of a sequence's state
  after a block-aligned token count t, keyed by the hash of the block ending at t (the KV block
  chain hash of tokens 0..t-1, see kv_cache.hash_block). Their number is sized from its own
  memory budget by the engine: one checkpoint costs cache_spec.state_bytes_per_sequence.

Checkpoint life: reserve(h) (the runner writes it during this step) -> commit(h) after the step
(now found by lookup) -> evicted when a slot is needed. A checkpoint restored this step (pinned by
restore()) or being written this step (pending) is never evicted, except a pinned one by the
sequence that restored it (`reserve(own=...)`: every restore of a step is copied before any
checkpoint is written); pins last until begin_step() of the next step.

Which goes first: each checkpoint has a rank, by how likely a later prompt is to resume there:
  PERIODIC    written every ~256 tokens in case a later prompt branches there (a guess);
  PROMPT_END  a raw prompt's last block boundary (the same prompt again: retries, n > 1 as
              separate requests);
  KEPT        where prompts are known to branch: a chat's cache points, a branch point found at
              admission (two prompts shared the KV up to it), or any checkpoint restored once.
A slot goes to the least recently used unpinned checkpoint of the lowest rank present, and only
if that rank is not above the new one's: a periodic checkpoint evicts only periodic ones. Plain
LRU let one long prompt's periodic checkpoints flush every other prefix from a CPU engine's few
slots (5 for a 4B; bench/prefix_checkpoints.py). No torch here.
"""

from __future__ import annotations

from collections import OrderedDict

from qwen35.engine.kv_cache import _check

PERIODIC, PROMPT_END, KEPT = 0, 1, 2  # checkpoint ranks: the lowest is evicted first


class StatePool:
    def __init__(self, num_slots: int, num_checkpoint_slots: int = 0):
        if num_slots < 1 or num_checkpoint_slots < 0:
            raise ValueError(
                f"need num_slots >= 1 and num_checkpoint_slots >= 0, "
                f"got {num_slots}, {num_checkpoint_slots}"
            )
        self.num_slots = num_slots
        self.num_checkpoint_slots = num_checkpoint_slots
        self._free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out 0 first
        self._free_ckpt = list(range(self.total_slots - 1, num_slots - 1, -1))
        self._ckpt: OrderedDict[bytes, int] = OrderedDict()  # committed, least recent first
        self._pending: dict[bytes, int] = {}  # written during the current step
        self._pinned: set[bytes] = set()  # restored during the current step
        self._rank: dict[bytes, int] = {}  # committed or pending ones above PERIODIC
        self.num_evictions = 0

    @property
    def total_slots(self) -> int:
        """Rows of the runner's state tensors: running slots + checkpoint slots."""
        return self.num_slots + self.num_checkpoint_slots

    # ---- running slots ----

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def allocate_slot(self) -> int:
        if not self._free_slots:
            raise ValueError("no free DeltaNet state slot; check num_free_slots first")
        return self._free_slots.pop()

    def free_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free_slots:
            raise ValueError(f"state slot {slot} is not an allocated running slot")
        self._free_slots.append(slot)

    # ---- checkpoints ----

    @property
    def num_checkpoints(self) -> int:
        """Committed checkpoints (restorable)."""
        return len(self._ckpt)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def lookup(self, h: bytes) -> int | None:
        """Slot of the committed checkpoint keyed by block hash `h`, or None."""
        return self._ckpt.get(h)

    def has_checkpoint(self, h: bytes) -> bool:
        return h in self._ckpt or h in self._pending

    def restore(self, h: bytes) -> int:
        """A sequence starts from this checkpoint this step: mark it recently used, pin it, and
        rank it KEPT (it paid off)."""
        self._ckpt.move_to_end(h)
        self._pinned.add(h)
        self._rank[h] = KEPT
        return self._ckpt[h]

    def reserve(self, h: bytes, rank: int = PERIODIC, own: bytes | None = None) -> int | None:
        """A checkpoint slot for `h` that the runner fills this step; when none is free, evicts
        the least recently used unpinned checkpoint of the lowest rank present, if that rank is
        not above `rank` (see the module's text). own: the checkpoint the writing sequence
        resumed from; it may go even in the step that restores it (the runner copies every
        restore of a step before it writes any checkpoint), so that with a single slot a
        conversation's checkpoint moves on with it. None when there is none such."""
        if self.has_checkpoint(h):
            raise ValueError("a checkpoint for this block hash exists already")
        if not self._free_ckpt:
            victim, low = None, rank + 1
            for k in self._ckpt:  # least recently used first
                r = self._rank.get(k, PERIODIC)
                if r < low and (k not in self._pinned or k == own):
                    victim, low = k, r
                    if r == PERIODIC:
                        break
            if victim is None:
                return None
            self._free_ckpt.append(self._ckpt.pop(victim))
            self._rank.pop(victim, None)
            self._pinned.discard(victim)  # (own: restored this step, copied before any write)
            self.num_evictions += 1
        slot = self._free_ckpt.pop()
        self._pending[h] = slot
        if rank > PERIODIC:
            self._rank[h] = rank
        return slot

    def commit(self, h: bytes) -> None:
        """The step that wrote the checkpoint finished: make it restorable (most recent)."""
        self._ckpt[h] = self._pending.pop(h)

    def cancel(self, h: bytes) -> None:
        """The checkpoint was not written (its sequence was aborted): give the slot back."""
        self._free_ckpt.append(self._pending.pop(h))
        self._rank.pop(h, None)

    def begin_step(self) -> None:
        self._pinned.clear()

    def clear_checkpoints(self) -> None:
        """Drop every committed checkpoint (cold prefix cache)."""
        self._free_ckpt.extend(self._ckpt.values())
        self._ckpt.clear()
        self._pinned.clear()
        self._rank = {k: r for k, r in self._rank.items() if k in self._pending}  # (still written)

    def check_integrity(self) -> None:
        """Every slot is exactly once free, running, committed or pending."""
        free = self._free_slots
        _check(len(set(free)) == len(free), "a running slot is twice in the free list")
        _check(all(0 <= s < self.num_slots for s in free), "a checkpoint slot in the running list")
        ckpt = self._free_ckpt + list(self._ckpt.values()) + list(self._pending.values())
        _check(sorted(ckpt) == list(range(self.num_slots, self.total_slots)), "checkpoint slots")
        _check(not (self._ckpt.keys() & self._pending.keys()), "committed and pending at once")
        _check(self._pinned <= self._ckpt.keys(), "a pinned checkpoint is not committed")
        _check(self._rank.keys() <= self._ckpt.keys() | self._pending.keys(), "a ranked one is gone")
