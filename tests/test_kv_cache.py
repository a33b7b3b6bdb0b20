"""KV block pool: allocation, ref counts, content-addressed blocks, LRU eviction, integrity."""

from __future__ import annotations

import random

import pytest

from qwen35.engine.kv_cache import KVBlockPool, extend_block_hashes, hash_block


def test_allocate_free_and_counts():
    pool = KVBlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and pool.num_free_blocks == 0 and pool.num_used_blocks == 8
    pool.check_integrity()
    with pytest.raises(ValueError, match="only 0 available"):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free_blocks == 3
    pool.check_integrity()
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(a)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        KVBlockPool(0, 16)


def test_hash_chain():
    toks = list(range(12))
    h = extend_block_hashes([], toks, 4)
    assert len(h) == 3
    assert h[1] == hash_block(h[0], toks[4:8])
    # equal block contents under different parents hash differently
    assert hash_block(None, [4, 5, 6, 7]) != h[1]
    # incremental extension equals one-shot; a partial block has no hash
    part = extend_block_hashes([], toks[:7], 4)
    assert len(part) == 1
    assert extend_block_hashes(part, toks + [99], 4) == h
    # the salt separates equal token ids (e.g. different images)
    assert extend_block_hashes([], toks, 4, salt="img-a")[0] != h[0]
    assert extend_block_hashes([], toks, 4, salt="img-a") != extend_block_hashes(
        [], toks, 4, salt="img-b"
    )


def test_cached_blocks_survive_free_and_are_matched():
    pool = KVBlockPool(6, 2)
    hashes = extend_block_hashes([], [1, 2, 3, 4, 5, 6], 2)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, hashes, strict=True):
        assert pool.register(b, h)
    assert pool.match_prefix(hashes) == blocks
    pool.free(blocks)
    assert pool.num_evictable_blocks == 3 and pool.num_free_blocks == 6
    pool.check_integrity()
    # still matched after release; acquire takes them out of the evictable list
    assert pool.match_prefix(hashes[:2]) == blocks[:2]
    assert pool.num_evictable_among(blocks[:2]) == 2
    pool.acquire(blocks[:2])
    assert pool.ref_counts[blocks[0]] == 1 and pool.num_evictable_blocks == 1
    pool.acquire(blocks[:1])  # a second holder
    assert pool.ref_counts[blocks[0]] == 2 and pool.num_evictable_among(blocks[:2]) == 0
    pool.check_integrity()


def test_match_stops_at_first_miss():
    pool = KVBlockPool(4, 2)
    h = extend_block_hashes([], [1, 2, 3, 4, 5, 6], 2)
    b = pool.allocate(3)
    pool.register(b[0], h[0])
    pool.register(b[2], h[2])
    assert pool.match_prefix(h) == [b[0]]
    assert pool.match_prefix(h[1:]) == []


def test_free_blocks_go_before_evictable_and_eviction_is_lru():
    pool = KVBlockPool(4, 1)
    h = extend_block_hashes([], [10, 11, 12], 1)
    a = pool.allocate(3)
    for b, hh in zip(a, h, strict=True):
        pool.register(b, hh)
    pool.free([a[0]])
    pool.free([a[2], a[1]])  # freed in reverse: a[1] released first, then a[2]
    free_block = pool.allocate(1)
    assert free_block[0] not in a and pool.num_evictions == 0  # the never-hashed block first
    order = [pool.allocate(1)[0] for _ in range(3)]
    assert order == [a[0], a[1], a[2]] and pool.num_evictions == 3
    assert pool.match_prefix(h) == [] and pool.num_cached_blocks == 0
    pool.check_integrity()


def test_eviction_never_touches_used_blocks():
    pool = KVBlockPool(3, 1)
    h = extend_block_hashes([], [1, 2], 1)
    a = pool.allocate(2)
    pool.register(a[0], h[0])
    pool.register(a[1], h[1])
    pool.free([a[1]])  # a[0] stays in use
    got = pool.allocate(2)
    assert a[0] not in got and pool.block_hash[a[0]] == h[0]
    with pytest.raises(ValueError):
        pool.allocate(1)
    pool.check_integrity()


def test_register_keeps_the_first_block_for_a_hash():
    pool = KVBlockPool(2, 2)
    h = hash_block(None, [1, 2])
    a, b = pool.allocate(2)
    assert pool.register(a, h) and not pool.register(b, h)
    pool.free([b])
    assert pool.num_free_blocks == 1 and pool.num_evictable_blocks == 0  # b had no hash
    pool.check_integrity()


def test_acquire_rejects_unhashed_block():
    pool = KVBlockPool(2, 2)
    (a,) = pool.allocate(1)
    with pytest.raises(ValueError, match="not a cached block"):
        pool.acquire([a])


def test_reset_cache():
    pool = KVBlockPool(4, 1)
    h = extend_block_hashes([], [1, 2], 1)
    a = pool.allocate(2)
    pool.register(a[0], h[0])
    pool.register(a[1], h[1])
    pool.free([a[0]])
    pool.reset_cache()
    assert pool.num_cached_blocks == 0 and pool.num_evictable_blocks == 0
    assert pool.match_prefix(h) == []
    pool.free([a[1]])
    assert pool.num_free_blocks == 4
    pool.check_integrity()


def test_integrity_catches_corruption():
    pool = KVBlockPool(4, 1)
    pool.allocate(1)
    pool._free.append(pool._free[0])  # a block twice in the free list
    with pytest.raises(AssertionError, match="integrity"):
        pool.check_integrity()


@pytest.mark.parametrize("seed", range(10))
def test_random_operations_keep_integrity(seed):
    rng = random.Random(seed)
    pool = KVBlockPool(16, 2)
    held: list[list[int]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks:
            blocks = pool.allocate(rng.randint(1, min(4, pool.num_free_blocks)))
            for b in blocks:
                if rng.random() < 0.5:
                    pool.register(b, hash_block(None, [rng.randrange(8), rng.randrange(8)]))
            held.append(blocks)
        elif op < 0.7 and held:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            h = hash_block(None, [rng.randrange(8), rng.randrange(8)])
            m = pool.match_prefix([h])
            if m:
                pool.acquire(m)
                held.append(m)
        pool.check_integrity()
        assert sum(pool.ref_counts) == sum(len(h) for h in held)
