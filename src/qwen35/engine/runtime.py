"""Process-wide CPU runtime settings the engine makes at start, in one explicit place.

`configure_cpu_runtime()` is called once by `LLMEngine` (switch it off with
`configure_runtime=False` / `--no-configure-runtime`); bare-model users (benchmarks) call it
themselves. It sets:
- torch's thread count, when asked;
- flush-to-zero for fp32 denormals: strong DeltaNet decays produce them, and the CPU's slow path
  for them makes GEMMs several times slower. Per thread: threads started later inherit it;
- glibc keeps freed memory in its heap (`keep_freed_memory_in_heap`);
- oneDNN's and ideep's caches of compiled matmuls hold at most ONEDNN_CACHE_CAPACITY entries
  (`limit_onednn_cache`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

log = logging.getLogger("qwen35")


def configure_cpu_runtime(threads: int | None = None) -> dict:
    """Apply the settings above; returns what was set (for logs and bench JSON)."""
    if threads:
        torch.set_num_threads(threads)
    return {
        "threads": torch.get_num_threads(),
        "flush_denormal": torch.set_flush_denormal(True),
        "freed_memory_kept_in_heap": keep_freed_memory_in_heap(),
        "onednn_primitive_cache": limit_onednn_cache(),
    }


# oneDNN (torch's CPU GEMMs for prefill rows) JIT-compiles a kernel per matmul shape, rows
# included, and two caches keep them: oneDNN's primitive cache and ideep's (torch's oneDNN
# wrapper) cache of matmul parameters, each the last 1,024 by default. Prompts of new lengths kept
# adding ~1 MB a length (the 0.8B, 300 prompts of 20-700 tokens: +602 MiB resident against +85
# MiB with both at 128, prefill tok/s within the noise: `python bench/onednn_cache.py`). A
# step's shapes (its row count with each weight's) are a few dozen at most, and a chunked
# prefill's row count changes with the decode rows beside it, so larger caches mostly keep
# kernels that never run again. (Set in os.environ: child processes inherit them.)
ONEDNN_CACHE_CAPACITY = 128
_CACHE_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's


def limit_onednn_cache() -> int:
    """Set both caches' capacity, each unless the environment sets it (each is read once, at
    the process's first oneDNN matmul: a process that ran one earlier keeps its capacities);
    returns oneDNN's primitive cache capacity (-1: a value that is not a number)."""
    for env in _CACHE_ENVS:
        os.environ.setdefault(env, str(ONEDNN_CACHE_CAPACITY))
    try:
        return int(os.environ[_CACHE_ENVS[0]])
    except ValueError:
        return -1  # (oneDNN's own parsing decides)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_heap_kept = False


def keep_freed_memory_in_heap() -> bool:
    """Make glibc serve large CPU allocations from the heap and keep freed memory there.

    By default glibc mmaps every block above its threshold (128 KiB, growing to at most
    32 MiB) and unmaps it on free, so each step's large temporaries (gathered DeltaNet states,
    logits, gathered KV) come back as fresh pages: page faults plus zeroing on every step, none
    after this call. The heap then stays at its peak (top trimmed above 1 GiB), as a GPU caching allocator
    does. Once per process; False where mallopt is unavailable (not glibc)."""
    global _heap_kept
    if _heap_kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _heap_kept = ok
    if not ok:
        log.debug("mallopt refused: large temporaries stay mmapped")
    return ok
