"""Process and machine memory: `release` returns the C heap's free memory to the OS (glibc's
malloc_trim; elsewhere nothing), `proc_bytes` reads a figure of /proc/meminfo or
/proc/self/status (Linux).

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
import sys


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
