"""Process and machine memory: `release` returns the C heap's free memory to the OS (glibc's
malloc_trim; elsewhere nothing), `proc_bytes` reads a figure of /proc/meminfo or
/proc/self/status (Linux), `zeros_on_touch` makes a large CPU tensor of zeros whose pages the OS
provides (zeroed) only where it is first touched.

Tensors below glibc's mmap threshold (which grows to 32 MiB as large blocks are freed) live in
the heap, and freed ones stay resident until trimmed: quantizing the 2B's weights while loading
left ~0.9 GiB of them beside its 1.3 GiB model, and quantizing one layer of 35B-A3B's experts
(256 experts, ~12 small temporaries each) grew the heap by 1-3 GiB. The loader releases after
loading, every GiB of weights it quantized, and every 32 experts. (An engine's CPU runtime,
engine/runtime.py keep_freed_memory_in_heap, serves every allocation from the heap on purpose:
these calls are then what gives the loader's freed memory back.)
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys

LAZY_ZEROS_MIN = 1 << 20  # smaller tensors: torch.zeros (a page-granular mapping each is waste)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def proc_bytes(path: str, field: str) -> int | None:
    """The `field:` line of a /proc file given in kB (MemAvailable of /proc/meminfo, RssAnon of
    /proc/self/status, ...) in bytes, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def zeros_on_touch(shape: tuple[int, ...], dtype):
    """A CPU tensor of zeros backed by private anonymous memory (mmap): the OS maps a zeroed page where
    it is first touched, so nothing is written or resident up front. For the engine's caches,
    sized for the longest contexts and most sequences and mostly untouched at first:
    torch.zeros wrote every byte at engine start (2 GiB: ~0.4 s here) and kept it resident.
    Freed with the tensor (it holds the mapping)."""
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < LAZY_ZEROS_MIN or not hasattr(mmap, "MAP_PRIVATE"):  # (MAP_PRIVATE: a Unix)
        return torch.zeros(shape, dtype=dtype)
    # private: a forked child gets its own copy, not shared memory (mmap's default for -1)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=dtype).view(shape)
