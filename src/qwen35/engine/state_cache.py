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
restore()) or being written this step (pending) is never evicted; pins last until begin_step() of
the next step.

Which goes first: the least recently used of the *periodic* ones (written every ~256 tokens in case
a later prompt branches there: a guess), and only when none is left the least recently used of the
*kept* ones: reserved with keep=True (where prompts are known or likely to branch: a chat's cache
points, a prompt's end, a branch point found at admission) or restored once (a guess that paid).
Plain LRU let one long prompt's periodic checkpoints flush every other prefix from a CPU engine's
few slots (bench/prefix_checkpoints.py). No torch here.
"""

from __future__ import annotations

from collections import OrderedDict

from qwen35.engine.kv_cache import _check


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
        self._kept: set[bytes] = set()  # committed or pending with keep, or restored once
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
        keep it ahead of the periodic ones (it paid off)."""
        self._ckpt.move_to_end(h)
        self._pinned.add(h)
        self._kept.add(h)
        return self._ckpt[h]

    def reserve(self, h: bytes, keep: bool = False) -> int | None:
        """A checkpoint slot for `h` that the runner fills this step; when none is free, evicts
        the least recently used unpinned periodic checkpoint, else the least recently used
        unpinned kept one. keep: `h` is where prompts branch (see the module's text). None when
        every slot is busy this step (a periodic checkpoint never evicts a kept one)."""
        if self.has_checkpoint(h):
            raise ValueError("a checkpoint for this block hash exists already")
        if not self._free_ckpt:
            free = [k for k in self._ckpt if k not in self._pinned]
            victim = next((k for k in free if k not in self._kept), None)
            if victim is None and keep and free:
                victim = free[0]
            if victim is None:
                return None
            self._free_ckpt.append(self._ckpt.pop(victim))
            self._kept.discard(victim)
            self.num_evictions += 1
        slot = self._free_ckpt.pop()
        self._pending[h] = slot
        if keep:
            self._kept.add(h)
        return slot

    def commit(self, h: bytes) -> None:
        """The step that wrote the checkpoint finished: make it restorable (most recent)."""
        self._ckpt[h] = self._pending.pop(h)

    def cancel(self, h: bytes) -> None:
        """The checkpoint was not written (its sequence was aborted): give the slot back."""
        self._free_ckpt.append(self._pending.pop(h))
        self._kept.discard(h)

    def begin_step(self) -> None:
        self._pinned.clear()

    def clear_checkpoints(self) -> None:
        """Drop every committed checkpoint (cold prefix cache)."""
        self._free_ckpt.extend(self._ckpt.values())
        self._ckpt.clear()
        self._pinned.clear()
        self._kept &= self._pending.keys()  # (pending ones are still written this step)

    def check_integrity(self) -> None:
        """Every slot is exactly once free, running, committed or pending."""
        free = self._free_slots
        _check(len(set(free)) == len(free), "a running slot is twice in the free list")
        _check(all(0 <= s < self.num_slots for s in free), "a checkpoint slot in the running list")
        ckpt = self._free_ckpt + list(self._ckpt.values()) + list(self._pending.values())
        _check(sorted(ckpt) == list(range(self.num_slots, self.total_slots)), "checkpoint slots")
        _check(not (self._ckpt.keys() & self._pending.keys()), "committed and pending at once")
        _check(self._pinned <= self._ckpt.keys(), "a pinned checkpoint is not committed")
        _check(self._kept <= self._ckpt.keys() | self._pending.keys(), "a kept checkpoint is gone")
