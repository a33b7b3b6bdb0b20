"""DeltaNet state pool: running slots, checkpoint slots (reserve/commit/eviction/pins), integrity."""

from __future__ import annotations

import random

import pytest

from qwen35.engine.state_cache import KEPT, PERIODIC, PROMPT_END, StatePool


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def committed(pool: StatePool, *ranks: int) -> None:
    """Checkpoints h(0), h(1), ... reserved at these ranks and committed, in that order."""
    for i, rank in enumerate(ranks):
        pool.reserve(h(i), rank)
        pool.commit(h(i))


def test_running_and_checkpoint_slots_are_disjoint_indices():
    pool = StatePool(3, 2)
    assert pool.total_slots == 5
    running = [pool.allocate_slot() for _ in range(3)]
    assert running == [0, 1, 2] and pool.num_free_slots == 0
    with pytest.raises(ValueError, match="no free DeltaNet state slot"):
        pool.allocate_slot()
    ckpt = [pool.reserve(h(0)), pool.reserve(h(1))]
    assert sorted(ckpt) == [3, 4]
    pool.check_integrity()
    pool.free_slot(1)
    assert pool.allocate_slot() == 1
    with pytest.raises(ValueError, match="not an allocated running slot"):
        pool.free_slot(3)


def test_double_free_is_an_error():
    pool = StatePool(2)
    s = pool.allocate_slot()
    pool.free_slot(s)
    with pytest.raises(ValueError):
        pool.free_slot(s)


def test_pending_checkpoint_is_not_restorable_until_commit():
    pool = StatePool(1, 2)
    slot = pool.reserve(h(7))
    assert pool.lookup(h(7)) is None and pool.has_checkpoint(h(7)) and pool.num_pending == 1
    with pytest.raises(ValueError, match="exists already"):
        pool.reserve(h(7))
    pool.commit(h(7))
    assert pool.lookup(h(7)) == slot and pool.num_checkpoints == 1 and pool.num_pending == 0
    pool.check_integrity()


def test_cancel_returns_the_slot():
    pool = StatePool(1, 1)
    pool.reserve(h(1))
    pool.cancel(h(1))
    assert not pool.has_checkpoint(h(1)) and pool.reserve(h(2)) is not None
    pool.check_integrity()


def test_lru_eviction_respects_restores():
    pool = StatePool(1, 3)
    committed(pool, PERIODIC, PERIODIC, PERIODIC)
    pool.begin_step()
    pool.restore(h(0))  # used: now most recent, and pinned this step
    s3 = pool.reserve(h(3))  # evicts h(1), the least recently used
    assert pool.lookup(h(1)) is None and pool.num_evictions == 1
    pool.commit(h(3))
    assert pool.lookup(h(3)) == s3
    pool.check_integrity()


def test_pinned_and_pending_checkpoints_are_never_evicted():
    pool = StatePool(1, 2)
    pool.reserve(h(0))
    pool.commit(h(0))
    pool.begin_step()
    pool.restore(h(0))
    pool.reserve(h(1))  # takes the free slot, pending
    assert pool.reserve(h(2)) is None  # h(0) pinned, h(1) pending: nothing to evict
    assert pool.lookup(h(0)) is not None
    pool.commit(h(1))
    pool.begin_step()  # pins end with the step
    assert pool.reserve(h(2), rank=KEPT) is not None and pool.lookup(h(1)) is None  # periodic
    pool.commit(h(2))
    pool.begin_step()
    assert pool.reserve(h(3), rank=KEPT) is not None and pool.lookup(h(0)) is None  # then LRU
    pool.check_integrity()


def test_periodic_checkpoints_go_before_kept_ones():
    pool = StatePool(1, 3)
    committed(pool, KEPT, PERIODIC, PERIODIC)  # h(0) kept and least recently used
    pool.begin_step()
    assert pool.reserve(h(3)) is not None and pool.lookup(h(1)) is None  # a periodic one
    assert pool.reserve(h(4), rank=KEPT) is not None and pool.lookup(h(2)) is None
    pool.commit(h(3))
    pool.commit(h(4))
    assert pool.reserve(h(5), rank=KEPT) is not None and pool.lookup(h(3)) is None
    pool.commit(h(5))
    assert pool.reserve(h(6)) is None  # every one kept: a periodic checkpoint evicts none
    assert pool.num_checkpoints == 3 and pool.num_evictions == 3
    assert pool.reserve(h(6), rank=KEPT) is not None and pool.lookup(h(0)) is None  # LRU kept
    pool.commit(h(6))
    pool.check_integrity()


def test_prompt_ends_rank_between_periodic_and_kept():
    pool = StatePool(1, 2)
    committed(pool, PROMPT_END, KEPT)
    assert pool.reserve(h(2)) is None  # a periodic one evicts neither
    assert pool.reserve(h(2), PROMPT_END) is not None and pool.lookup(h(0)) is None
    pool.commit(h(2))
    assert pool.reserve(h(3), PROMPT_END) is not None and pool.lookup(h(2)) is None
    pool.commit(h(3))
    assert pool.lookup(h(1)) is not None  # the kept one stayed, though least recently used
    assert pool.reserve(h(4), KEPT) is not None and pool.lookup(h(3)) is None  # lowest rank
    pool.check_integrity()


def test_a_restored_checkpoint_is_kept():
    pool = StatePool(1, 2)
    committed(pool, PERIODIC, PERIODIC)
    pool.begin_step()
    pool.restore(h(0))
    pool.begin_step()
    pool.restore(h(1))  # now h(0) is the least recently used, but both are kept
    pool.begin_step()
    assert pool.reserve(h(2)) is None
    assert pool.reserve(h(2), rank=KEPT) is not None and pool.lookup(h(0)) is None
    pool.cancel(h(2))  # (a cancelled reservation leaves nothing ranked behind)
    pool.clear_checkpoints()
    assert pool.num_checkpoints == 0 and not pool._rank
    pool.check_integrity()


def test_a_restorer_may_take_its_own_pinned_checkpoints_slot():
    """The checkpoint a sequence resumes from this step is pinned against every other
    reservation, but that sequence's own deeper one may take its slot (the runner copies every
    restore before writing any checkpoint): one slot then moves along a conversation."""
    pool = StatePool(1, 1)
    pool.reserve(h(0), KEPT)
    pool.commit(h(0))
    pool.begin_step()
    slot = pool.restore(h(0))
    assert pool.reserve(h(1), KEPT) is None  # pinned: not for another sequence
    assert pool.reserve(h(1), PERIODIC, own=h(0)) is None  # nor for a lower rank
    assert pool.reserve(h(1), KEPT, own=h(0)) == slot and pool.lookup(h(0)) is None
    pool.commit(h(1))
    pool.check_integrity()


def test_zero_checkpoint_capacity():
    pool = StatePool(4, 0)
    assert pool.total_slots == 4 and pool.reserve(h(0)) is None


def test_clear_checkpoints():
    pool = StatePool(1, 2)
    pool.reserve(h(0))
    pool.commit(h(0))
    pool.clear_checkpoints()
    assert pool.num_checkpoints == 0 and pool.lookup(h(0)) is None
    pool.check_integrity()


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_slots"):
        StatePool(0, 1)
    with pytest.raises(ValueError, match="num_checkpoint_slots"):
        StatePool(1, -1)


def test_integrity_catches_a_lost_slot():
    pool = StatePool(1, 2)
    pool._free_ckpt.pop()
    with pytest.raises(AssertionError, match="integrity"):
        pool.check_integrity()


@pytest.mark.parametrize("seed", range(10))
def test_random_checkpoint_traffic(seed):
    rng = random.Random(seed)
    pool = StatePool(2, 4)
    for _ in range(50):  # steps
        pool.begin_step()
        pinned, pending = set(), []
        for _ in range(rng.randint(0, 4)):
            key = h(rng.randrange(10))
            if pool.lookup(key) is not None and rng.random() < 0.5:
                pool.restore(key)
                pinned.add(key)
            elif not pool.has_checkpoint(key):
                rank = rng.choice((PERIODIC, PERIODIC, PROMPT_END, KEPT))
                before = list(pool._ckpt)  # least recently used first
                ranks = {k: pool._rank.get(k, PERIODIC) for k in before}
                own = rng.choice([*pinned, None]) if pinned else None  # (a restorer's)
                evictable = [k for k in before if k not in pinned or k == own]
                if pool.reserve(key, rank, own) is not None:
                    pending.append(key)
                    gone = set(before) - set(pool._ckpt)
                    assert len(gone) <= 1 and gone <= set(evictable)
                    pinned -= gone
                    if gone:  # the least recently used of the lowest rank, not above `rank`
                        low = min(ranks[k] for k in evictable)
                        assert low <= rank and gone == {next(k for k in evictable
                                                              if ranks[k] == low)}  # fmt: skip
                else:  # nothing it could evict
                    assert all(ranks[k] > rank for k in evictable)
        assert all(pool.lookup(k) is not None for k in pinned)  # survived this step's evictions
        for key in pending:
            pool.cancel(key) if rng.random() < 0.2 else pool.commit(key)
        pool.check_integrity()
        assert pool.num_checkpoints <= 4 and pool.num_pending == 0
