"""Paged block pool for the full-attention layers' KV, with content-addressed (prefix-cached) blocks.

Block b holds tokens of one sequence at flat KV slots b*block_size .. b*block_size+block_size-1;
a sequence's block table (`Sequence.block_ids`) lists its blocks in token order. The pool only
counts: the runner owns the tensors ([num_blocks, block_size, nkv, hd] per layer).

Every block is in exactly one of three states:
- free:      ref count 0, no hash; handed out first.
- used:      ref count > 0 (shared prefix blocks count one per holder).
- evictable: ref count 0 but still carrying a hash, so a later request with the same prefix can
             take it back; reallocated (and its hash dropped) only when no free block is left,
             least recently released first.

A full block's hash chains its parent's: hash(parent_hash, tokens in block), so equal hashes mean
equal whole prefixes. blake2b rather than Python's hash(): a crafted collision would let one
request read another's KV. No torch here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, abc, deque


def _root_hash(salt: str | None) -> bytes:
    return hashlib.blake2b(b"qwen35-root:" + (salt or "").encode(), digest_size=16).digest()


def hash_block(parent: bytes | None, tokens: abc.Sequence[int], salt: str | None = None) -> bytes:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = hashlib.blake2b(parent if parent is not None else _root_hash(salt), digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: abc.Sequence[int], block_size: int, salt: str | None = None
) -> list[bytes]:
    """Append the hashes of the full blocks of `token_ids` not yet in `hashes` (in place)."""
    for k in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[k - 1] if k else None
        hashes.append(hash_block(parent, token_ids[k * block_size : (k + 1) * block_size], salt))
    return hashes


class KVBlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._cached: dict[bytes, int] = {}  # hash -> block holding that content
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: free + evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks carrying a hash (used or evictable)."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} KV blocks, only {self.num_free_blocks} available")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._uncache(b)
                self.num_evictions += 1
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: abc.Sequence[int]) -> None:
        """Drop one reference to each block. Tail blocks go first so they are evicted first:
        a sequence's later blocks are the least likely to be shared."""
        for b in reversed(block_ids):
            if self.ref_counts[b] <= 0:
                raise ValueError(f"KV block {b} freed more often than allocated")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def match_prefix(self, hashes: abc.Sequence[bytes]) -> list[int]:
        """Blocks of the longest run of `hashes` (from the first) present in the cache."""
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_evictable_among(self, block_ids: abc.Sequence[int]) -> int:
        """How many of these cached blocks acquire() would take out of the allocatable pool."""
        return sum(self.ref_counts[b] == 0 for b in block_ids)

    def acquire(self, block_ids: abc.Sequence[int]) -> None:
        """Take a reference to cached blocks found by match_prefix (prefix-cache hit)."""
        for b in block_ids:
            if self.block_hash[b] is None:
                raise ValueError(f"KV block {b} is not a cached block")
            if self.ref_counts[b] == 0:
                del self._evictable[b]
            self.ref_counts[b] += 1

    def register(self, block_id: int, h: bytes) -> bool:
        """Mark a full, computed block as holding the prefix `h`. A hash already held by another
        block keeps its first block (this one stays private and is freed without a hash)."""
        if h in self._cached or self.block_hash[block_id] is not None:
            return False
        self.block_hash[block_id] = h
        self._cached[h] = block_id
        return True

    def reset_cache(self) -> None:
        """Forget every hash (cold prefix cache); evictable blocks become free."""
        for b in range(self.num_blocks):
            self.block_hash[b] = None
        self._cached.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def _uncache(self, b: int) -> None:
        h = self.block_hash[b]
        self.block_hash[b] = None
        if h is not None and self._cached.get(h) == b:
            del self._cached[h]

    def check_integrity(self) -> None:
        """free + used + evictable == total; every state consistent with ref counts and hashes."""
        free, evictable = set(self._free), set(self._evictable)
        used = {b for b, rc in enumerate(self.ref_counts) if rc > 0}
        _check(len(free) == len(self._free), "a block is twice in the free list")
        _check(not (free & evictable), "a block is both free and evictable")
        _check(not (used & (free | evictable)), "a block with references is free or evictable")
        _check(len(free) + len(evictable) + len(used) == self.num_blocks, "blocks lost or doubled")
        _check(all(rc >= 0 for rc in self.ref_counts), "negative ref count")
        _check(all(self.block_hash[b] is None for b in free), "a free block carries a hash")
        _check(all(self.block_hash[b] is not None for b in evictable), "evictable without hash")
        hashed = [(b, h) for b, h in enumerate(self.block_hash) if h is not None]
        _check(len(hashed) == len(self._cached), "hash map and block hashes disagree")
        _check(all(self._cached.get(h) == b for b, h in hashed), "hash map points elsewhere")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(f"cache integrity: {msg}")
