"""Prefix-cache entries on disk (`--prefix-cache-dir DIR`): prompt prefixes that outlive the engine.

The memory prefix cache (kv_cache.py, state_cache.py) is gone when the engine stops, and on a CPU
a long system prompt or agent context takes seconds to minutes to compute again. With a folder,
the state checkpoints a prompt's prefill writes go to disk too (those at the prompt's end, at a
branch point another request shares, and every `disk_interval` tokens, ~1,024), each as a
*segment*: one safetensors file named by the block hash of its end (`kv_cache.hash_block`, the
memory cache's key, so salts and image contents key it alike), holding its tokens, the K / V of
every full-attention layer for the blocks since the deepest segment already stored along the
same prefix (its parent) and the conv + recurrent state of every Gated DeltaNet layer after its
last block. The folder is a tree: a shared system prompt's segments are stored once and each
conversation branches off them. A later engine of the same model and numerics finds the deepest
segment along a new prompt's blocks whose chain to the root is whole and that memory does not
already hold, copies its KV and state into free blocks and a checkpoint slot (`import_prefix`),
and the request then hits as if the prefix had been computed in this engine: the same bytes, so
the same tokens as a memory hit.

One folder per fingerprint (`fingerprint`: weight files, a sample of every parameter, dtypes,
cache layout, device, backend, CPU kernels, versions) under DIR, so engines of other models or
numerics never read each other's entries. Files are written by a background thread to a
temporary name and renamed; the folder is kept under its size budget by removing the least
recently used files, a chain's root marked most recent whenever it is used (so leaves go before
the segments others build on). A file that does not read back as expected (damaged, tokens or
shapes that differ) is removed and the prompt computed. Nothing here can stop the engine: a
failed read or write is logged and counted (`stats`). LoRA requests are stored under their
adapter's weights' hash (`LoraAdapter.digest`, in their cache salt). Under tensor parallelism
every rank keeps its shard of each segment (`RankShards`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import platform
import queue
import threading
import time
from pathlib import Path

import torch

from qwen35.engine.state_cache import KEPT
from qwen35.errors import Qwen35Error

log = logging.getLogger("qwen35")

FORMAT = 1
SUFFIX = ".safetensors"
MAX_PENDING_BYTES = 2 << 30  # copies waiting for the writer; past this a save is skipped
PARAM_SAMPLE_BYTES = 4096  # of every parameter and buffer, into the fingerprint
STALE_TMP_S = 3600  # a temporary file this old was left by a writer that died
DISK_INTERVAL_TOKENS = 1024  # periodic checkpoints kept on disk: about this far apart


def fingerprint(model: torch.nn.Module, caches, **numerics) -> dict:
    """What a stored prefix's bytes depend on: the weights (their files' paths, sizes and mtimes,
    and the first bytes of every parameter), the cache layout and dtypes, and `numerics` (dtype,
    quantization, device, backend, ...)."""
    from qwen35 import __version__
    from qwen35.devices import avx2_forced, cpu_flags

    report = getattr(model, "load_report", None)
    files = []
    for f in getattr(report, "files", None) or []:
        try:
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([str(f), None, None])
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:  # (a part never loaded)
            continue
        flat = t.detach().reshape(-1)
        n = max(1, PARAM_SAMPLE_BYTES // max(1, flat.element_size()))
        sample = flat[:n].to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return {
        "format": FORMAT,
        "qwen35": __version__,
        "torch": torch.__version__,
        "source": None if report is None else str(report.source),
        "load_format": None if report is None else report.load_format,
        "files": files,
        "params": h.hexdigest(),
        "kv": [[list(k.shape[1:]), str(k.dtype)] for k in caches.key],
        "conv": [[list(c.shape[1:]), str(c.dtype)] for c in caches.conv],
        "recurrent": [[list(r.shape[1:]), str(r.dtype)] for r in caches.recurrent],
        "block_size": caches.block_size,
        "cpu_kernels": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
        + (["avx2-forced"] if avx2_forced() else []),
        "machine": platform.machine(),
        **{k: None if v is None else str(v) for k, v in numerics.items()},
    }


class PrefixStore:
    """The folder of one fingerprint: a tree of segment files, found, read and (in the
    background) written. Segment h (the hash of its last block) holds the KV of blocks
    [start, end) and the DeltaNet state after block end; its parent is the segment ending at
    block start ("" at the root)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, min_tokens: int,
                 finger: dict | None):  # fmt: skip
        """The folder of `finger` under root (None: root itself, a worker rank's folder)."""
        self.dir = Path(root).expanduser()
        if finger is not None:
            blob = json.dumps(finger, sort_keys=True).encode()
            self.dir /= hashlib.blake2b(blob, digest_size=8).hexdigest()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            info = self.dir / "fingerprint.json"
            if finger is not None and not info.exists():  # for people: what the entries need
                _write_atomic(info, lambda p: p.write_text(json.dumps(finger, indent=1)))
        except OSError as e:
            raise Qwen35Error(
                f"--prefix-cache-dir {root}: cannot write there ({e.strerror or e}); give a "
                f"folder this user may write"
            ) from None
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.stats = {"disk_hits": 0, "disk_hit_tokens": 0, "disk_saves": 0, "disk_read_errors": 0,
                      "disk_write_errors": 0, "disk_skipped_saves": 0}  # fmt: skip
        self._queue: queue.Queue = queue.Queue()
        self._queued: set[bytes] = set()  # hashes waiting for the writer (count as stored)
        self._pending = 0  # their bytes
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listed: tuple[int, set[str]] = (-1, set())  # (the folder's mtime, _names())
        self.ranks = None  # RankShards under tensor parallelism: the other ranks' files

    def path(self, h: bytes) -> Path:
        return self.dir / (h.hex() + SUFFIX)

    def has(self, h: bytes) -> bool:
        """Segment h is stored or queued (the folder's listing: no stat per hash)."""
        with self._lock:
            if h in self._queued:
                return True
        return h.hex() in self._names()

    def chain(self, h: bytes) -> list[tuple[Path, int, int]] | None:
        """The segments from the root to segment h, as (path, start, end) blocks; None where one
        is missing (pruned: the rest waits for its turn to be pruned) or damaged (removed)."""
        from safetensors import safe_open

        out, key = [], h.hex()
        while key:
            path = self.dir / (key + SUFFIX)
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                start, end, key = int(meta["start"]), int(meta["end"]), meta["parent"]
            except FileNotFoundError:
                return None
            except Exception as e:  # noqa: BLE001 - a damaged file: a miss, and gone
                self._bad(path, e)
                return None
            if out and end != out[-1][1] or not 0 <= start < end:
                return None
            out.append((path, start, end))
        if out[-1][1] != 0:
            return None
        return out[::-1]

    def find(self, hashes: list[bytes], above: int) -> tuple[int, list] | None:
        """The deepest k > above whose prefix of k blocks (hashes[k - 1]) has a whole chain of
        segments: (k, chain)."""
        names = self._names()
        for k in range(len(hashes), above, -1):
            if hashes[k - 1].hex() in names:
                chain = self.chain(hashes[k - 1])
                if chain is not None and chain[-1][2] == k:
                    return k, chain
        return None

    def _names(self) -> set[str]:
        """The stems of the folder's segment files, listed again only when the folder changed
        (its mtime: any file made, renamed or removed, by any engine): a long prompt looks up
        thousands of block hashes."""
        try:
            stamp = os.stat(self.dir).st_mtime_ns
        except OSError:
            return set()
        if stamp != self._listed[0]:
            try:
                names = {n[: -len(SUFFIX)] for n in os.listdir(self.dir) if n.endswith(SUFFIX)}
            except OSError:
                return set()
            self._listed = (stamp, names)
        return self._listed[1]

    def read(self, chain, tokens: list[int], first: int, expect: dict[str, tuple]) -> dict | None:
        """KV of blocks first..end of the chain (name -> its parts, a segment's each, [blocks,
        ...] in order: copied into the cache as they are) and the state after it, each segment's
        tokens checked against the prompt's and every tensor against its (shape, dtype); None
        (the bad file removed) if anything differs."""
        from safetensors import safe_open

        bs = len(tokens) // chain[-1][2]
        kv = [n for n in expect if _is_kv(n)]
        out: dict = {n: [] for n in kv}
        path = None
        try:
            for path, start, end in chain:
                with safe_open(path, framework="pt") as f:
                    got = f.get_tensor("tokens").tolist()
                    if got != list(tokens[start * bs : end * bs]):
                        raise ValueError("its tokens are not the prompt's")
                    if end > first:
                        for name in kv:
                            out[name].append(f.get_tensor(name)[max(first - start, 0) :])
                    if end == chain[-1][2]:
                        out.update({n: f.get_tensor(n) for n in expect if not _is_kv(n)})
            for name, (shape, dtype) in expect.items():
                parts = out[name] if _is_kv(name) else [out.get(name)]
                if any(t is None or t.dtype != dtype or t.shape[1:] != shape[1:] for t in parts) \
                        or sum(t.shape[0] for t in parts) != shape[0]:  # fmt: skip
                    raise ValueError(f"tensor {name} is missing or of another shape or dtype")
        except FileNotFoundError:  # pruned since find() (by another engine)
            return None
        except Exception as e:  # noqa: BLE001 - a bad file is a miss, never a failed request
            self._bad(path, e)
            return None
        self._touch([p for p, _, _ in chain])
        return out

    def _bad(self, path: Path | None, e: Exception) -> None:
        self.stats["disk_read_errors"] += 1
        name = "?" if path is None else path.name
        log.warning("prefix cache file %s does not read back (%s): removed", name, e)
        if path is not None:
            path.unlink(missing_ok=True)

    def save(self, h: bytes, parent: bytes | None, start: int, end: int, tokens: list[int],
             tensors: dict[str, torch.Tensor]) -> None:  # fmt: skip
        """Queue segment h: blocks start..end (`tokens`: theirs), after `parent`'s (CPU tensors,
        owned by the store from here)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            if size > self.max_bytes or self._pending + size > MAX_PENDING_BYTES:
                self.stats["disk_skipped_saves"] += 1
                return
            self._pending += size
            self._queued.add(h)
        meta = {"format": str(FORMAT), "parent": parent.hex() if parent else "",
                "start": str(start), "end": str(end)}  # fmt: skip
        tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64), **tensors}
        self._queue.put((h, tensors, meta, size))
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="qwen35-prefix-store",
                                            daemon=True)  # fmt: skip
            self._thread.start()
            atexit.register(self.close)  # (a process that never shut its engine down)

    def flush(self) -> None:
        """Wait until every queued file is written."""
        self._queue.join()

    def clear(self) -> int:
        """Remove every segment file (after the queued ones are written): -> how many (this
        rank's; the other ranks clear theirs too)."""
        self.flush()
        n = 0
        for p in self.dir.glob("*" + SUFFIX):
            p.unlink(missing_ok=True)
            n += 1
        if self.ranks is not None:
            self.ranks.clear()
        return n

    def close(self) -> None:
        if self._thread is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # ---- the writer thread ----

    def _writer(self) -> None:
        from safetensors.torch import save_file

        while (item := self._queue.get()) is not None:
            h, tensors, meta, size = item
            try:
                path = self.path(h)
                if not path.exists():
                    _write_atomic(path, lambda p, t=tensors, m=meta: save_file(t, p, metadata=m))
                    self.stats["disk_saves"] += 1
                    chain = self.chain(h)
                    if chain is not None:
                        self._touch([p for p, _, _ in chain])
                    self._prune()
            except Exception as e:  # noqa: BLE001 - a full disk must not stop the engine
                self.stats["disk_write_errors"] += 1
                log.warning("prefix cache: writing %s failed (%s)", h.hex(), e)
            finally:
                with self._lock:
                    self._pending -= size
                    self._queued.discard(h)
                self._queue.task_done()
        self._queue.task_done()

    @staticmethod
    def _touch(paths: list[Path]) -> None:
        """Mark a chain used now, the root most recently: pruning (oldest first) then takes
        leaves before the segments other files build on."""
        now = time.time()
        for i, p in enumerate(paths):
            try:
                os.utime(p, (now - i * 1e-3, now - i * 1e-3))
            except OSError:
                pass

    def _prune(self) -> None:
        """Remove the least recently used files until the folder fits its budget (and what a
        killed writer left half-written)."""
        stale = time.time() - STALE_TMP_S
        for p in self.dir.glob(".tmp-*"):
            try:
                if p.stat().st_mtime < stale:
                    p.unlink()
            except OSError:
                pass
        files = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- the engine's side: memory cache <-> files ----


def disk_interval(checkpoint_interval: int) -> int:
    """Tokens between the periodic checkpoints that also go to disk: the memory cache's
    interval times the multiple nearest DISK_INTERVAL_TOKENS (a state costs as much disk as
    ~1,500-3,000 tokens of KV, so not every memory checkpoint is kept)."""
    return checkpoint_interval * max(1, round(DISK_INTERVAL_TOKENS / checkpoint_interval))


def _expect(caches, num_blocks: int) -> dict[str, tuple]:
    out = {}
    for i, (k, v) in enumerate(zip(caches.key, caches.value, strict=True)):
        out[f"k.{i}"] = ((num_blocks, *k.shape[1:]), k.dtype)
        out[f"v.{i}"] = ((num_blocks, *v.shape[1:]), v.dtype)
    for j, (c, r) in enumerate(zip(caches.conv, caches.recurrent, strict=True)):
        out[f"conv.{j}"] = (tuple(c.shape[1:]), c.dtype)
        out[f"rec.{j}"] = (tuple(r.shape[1:]), r.dtype)
    return out


def _is_kv(name: str) -> bool:
    """A segment's K / V tensor (k.i, v.i: [blocks, ...]); the others are states (conv.j, rec.j)."""
    return name.startswith(("k.", "v."))


def _stored(seq) -> bool:
    """Requests whose prefixes go to (and come from) the disk: those whose prompt rows are not
    all needed (prompt logprobs)."""
    return not seq.needs_prompt_logprobs


def import_prefix(store: PrefixStore, scheduler, caches, seq) -> int:
    """Before `seq` is admitted: where the folder holds a longer prefix of it than memory does,
    copy it into free KV blocks and a checkpoint slot registered under its hashes (admission then
    finds it as a memory hit). -> tokens imported (0: none)."""
    bs = scheduler.config.block_size
    limit = (seq.num_tokens - 1) // bs  # blocks a hit may cover (one token is left to compute)
    if not _stored(seq) or limit * bs < store.min_tokens:
        return 0
    kv, state = scheduler.kv, scheduler.state
    hashes = scheduler.prefix_hashes(seq)[:limit]
    blocks = kv.match_prefix(hashes)
    in_memory = next(
        (k for k in range(len(blocks), 0, -1) if state.lookup(hashes[k - 1]) is not None), 0
    )
    found = store.find(hashes, above=in_memory)
    if found is None:
        return 0
    k, chain = found
    keep = blocks[:k]  # blocks memory holds along the prefix: their KV stays
    expect = _expect(caches, k - len(keep))
    data = store.read(chain, seq.token_ids[: k * bs], len(keep), expect)
    if data is None:
        return 0
    kv.acquire(keep)  # (so that allocating the others cannot evict them)
    new, h, slot = [], hashes[k - 1], None
    try:
        if k - len(keep) > kv.num_free_blocks:
            return 0
        if state.lookup(h) is None:  # (kept: admission restores it next)
            slot = state.reserve(h, KEPT)
            if slot is None:
                return 0
        new = kv.allocate(k - len(keep))
        _copy_in(caches, data, new, slot)
        if store.ranks is not None and not store.ranks.load(chain, seq.token_ids[: k * bs],
                                                             len(keep), new, slot):  # fmt: skip
            store.path(h).unlink(missing_ok=True)  # (a rank lacks its shard: not again)
            store.stats["disk_read_errors"] += 1
            return 0
        for j, b in enumerate(new):
            kv.register(b, hashes[len(keep) + j])
        if slot is not None:
            state.commit(h)
            slot = None
    except Exception as e:  # noqa: BLE001 - the prompt is then computed, as without the file
        log.warning("prefix cache: restoring %s failed (%s)", h.hex(), e)
        store.stats["disk_read_errors"] += 1
        return 0
    finally:
        if slot is not None:
            state.cancel(h)
        kv.free(keep + new)
    store.stats["disk_hits"] += 1
    store.stats["disk_hit_tokens"] += k * bs
    return k * bs


def _copy_in(caches, data: dict, blocks: list[int], slot: int | None) -> None:
    if blocks:
        idx = torch.tensor(blocks, dtype=torch.long, device=caches.key[0].device)
        for i, (k, v) in enumerate(zip(caches.key, caches.value, strict=True)):
            for cache, parts in ((k, data[f"k.{i}"]), (v, data[f"v.{i}"])):
                at = 0
                for t in parts:  # a segment's blocks at a time (no concatenated copy)
                    rows = idx[at : at + t.shape[0]]
                    _raw(cache).index_copy_(0, rows, _raw(t).to(cache.device))
                    at += t.shape[0]
    if slot is not None:
        for j, (c, r) in enumerate(zip(caches.conv, caches.recurrent, strict=True)):
            c[slot].copy_(data[f"conv.{j}"])
            r[slot].copy_(data[f"rec.{j}"])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 caches as bytes (index_copy_ has no fp8 kernel on CPUs)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def export_prefixes(store: PrefixStore, scheduler, caches, output, skip: set[str]) -> None:
    """After a step's update(): queue a segment for each checkpoint the step wrote at a prompt's
    end or its cache points (`Scheduler.prompt_checkpoints`), at a branch point (a prefix
    another request shares) or every `disk_interval` tokens (sequences in `skip` failed this
    step)."""
    cfg = scheduler.config
    bs, every = cfg.block_size, disk_interval(cfg.checkpoint_interval)
    saves = []  # (h, parent, start, end, tokens, blocks, slot): the workers' too
    for s in output.scheduled:
        seq = s.seq
        if not s.checkpoints or seq.seq_id in skip or not _stored(seq):
            continue
        marks = {*scheduler.prompt_checkpoints(seq), seq.branch_point}
        for n, slot in s.checkpoints:
            t = s.start + n
            if t < store.min_tokens or t not in marks and t % every:
                continue
            hashes = seq.block_hashes[: t // bs]
            if len(hashes) < t // bs or scheduler.state.lookup(hashes[-1]) != slot:
                continue  # (cancelled: the sequence was aborted)
            if store.has(hashes[-1]):
                continue
            blocks = scheduler.kv.match_prefix(hashes)
            if len(blocks) < len(hashes):
                continue
            a = next((k for k in range(len(hashes) - 1, 0, -1) if store.has(hashes[k - 1])), 0)
            item = (hashes[-1], hashes[a - 1] if a else None, a, t // bs,
                    seq.token_ids[a * bs : t], blocks[a:], slot)  # fmt: skip
            save_shard(store, caches, *item)
            saves.append(item)
    if saves and store.ranks is not None:
        store.ranks.save(saves)


def save_shard(store: PrefixStore, caches, h, parent, start, end, tokens, blocks, slot) -> None:
    """Queue segment h of these caches: the KV of `blocks` and the state in `slot`."""
    idx = torch.tensor(blocks, dtype=torch.long, device=caches.key[0].device)
    tensors = {}
    for i, (k, v) in enumerate(zip(caches.key, caches.value, strict=True)):
        tensors[f"k.{i}"] = k.index_select(0, idx).to("cpu")
        tensors[f"v.{i}"] = v.index_select(0, idx).to("cpu")
    for j, (c, r) in enumerate(zip(caches.conv, caches.recurrent, strict=True)):
        tensors[f"conv.{j}"] = c[slot].to("cpu", copy=True)
        tensors[f"rec.{j}"] = r[slot].to("cpu", copy=True)
    store.save(h, parent, start, end, tokens, tensors)


def load_shard(store: PrefixStore, caches, chain, tokens, first, blocks, slot) -> bool:
    """Copy the chain of segments (names, start, end) from this store's folder into these
    caches: blocks first.. into `blocks`, the state into `slot` (None: not needed)."""
    store.flush()  # (segments rank 0 asked for a moment ago may still be queued here)
    paths = [(store.dir / (name + SUFFIX), start, end) for name, start, end in chain]
    data = store.read(paths, tokens, first, _expect(caches, len(blocks)))
    if data is None:
        return False
    _copy_in(caches, data, blocks, slot)
    return True


class RankShards:
    """Under tensor parallelism each rank holds a shard of the caches, so each keeps its shard of
    every segment in a folder of its own (`rank{r}` inside rank 0's), written and read in step
    with rank 0: its saves and restores go to the workers as control messages (parallel/worker.py
    `_loop`), and a restore stands only where every rank read its shard (an all-reduce)."""

    def __init__(self, group):
        self.group = group

    def start(self, store: PrefixStore) -> None:
        self._send(("prefix_store", str(store.dir), store.max_bytes, store.min_tokens))

    def clear(self) -> None:
        self._send(("prefix_clear",))

    def save(self, items: list) -> None:
        self._send(("prefix_save", items))

    def load(self, chain, tokens, first, blocks, slot) -> bool:
        names = [(p.name[: -len(SUFFIX)], start, end) for p, start, end in chain]
        self._send(("prefix_load", names, tokens, first, blocks, slot))
        return self.group.guard(all_ranks_ok, True, self.group.control)

    def _send(self, msg) -> None:
        from qwen35.parallel.group import broadcast

        self.group.guard(broadcast, self.group.control, msg)


def all_ranks_ok(ok: bool, control) -> bool:
    """Every rank's answer, on every rank (rank 0 and the workers call it together)."""
    import torch.distributed as dist

    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=control)
    return bool(flag.item())
