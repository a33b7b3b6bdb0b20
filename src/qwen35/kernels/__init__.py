"""Optional native CPU kernels, compiled on first use with torch's C++ extension builder.

Each kernel has a plain PyTorch path beside it and a test against that path; when a kernel
can't be used (no compiler, a CPU without the instructions, QWEN35_NO_KERNELS=1) the caller
falls back to the PyTorch op. QWEN35_NO_KERNELS=1 switches them off at any time, also after a
first load. The build is cached by torch under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR),
so only the first process on a machine pays it (README: Model implementation); `prebuild` compiles
several modules side by side (the CPU backend's).

- `deltanet_decode(qkv, conv_state, conv_w, g, beta, state, num_key_heads, avx2_only=False)`:
  a DeltaNet layer's decode step after its projections, two passes over each head's state
  instead of five (ops/deltanet.py; its PyTorch twin is the slot-run path there, reference
  backend; bench/deltanet_decode.py times it).
- `deltanet_decode_gated(qkv, z, a, b, conv_state, conv_w, dt_bias, A_log, state, norm_w, eps,
  num_key_heads)`: the same step with the gates before it and the gated output norm after it,
  bitwise the op-by-op path, one call a layer at pure decode steps (ops/deltanet.py).
- `deltanet_chunk(q, k, v, g, beta, state, o, ck, ck_states, scale, avx2_only=False)`:
  a prefill's chunked gated delta rule, one value head a task, chunk by chunk in L1 / L2
  (ops/deltanet.py chunk_native; its PyTorch twin ops/gated_delta.py chunk_gated_delta_rule;
  bench/deltanet_prefill.py times both).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from qwen35.devices import cpu_flags

log = logging.getLogger("qwen35")

STALE_LOCK_S = 600  # a build lock older than this was left by a process killed mid-build
FLAGS = ("avx2", "fma")  # the build targets x86-64 with AVX2 + FMA (any CPU of the last decade)


def switched_off() -> bool:
    return os.environ.get("QWEN35_NO_KERNELS", "") not in ("", "0")


def supported() -> bool:
    """The CPU has the instructions and kernels are not switched off."""
    if switched_off():
        return False
    flags = cpu_flags()
    return all(f in flags for f in FLAGS)


class Native:
    """One C++ source of this folder (or of `folder`), compiled on first use (once per machine,
    checkout and source version: the build directory is named by a hash of the source, the
    headers of its folder and the folder's path, so two checkouts never rebuild each other's
    module).
    `load()` gives the module, or None where it can't be had (switched off, a CPU without
    `needs`, no compiler); a failed build is logged once."""

    def __init__(self, source: str, cflags: tuple[str, ...], needs: tuple[str, ...] = FLAGS,
                 folder: Path | None = None):  # fmt: skip
        self.source, self.cflags, self.needs = source, cflags, needs
        self.folder = folder or Path(__file__).parent
        self._module, self._tried = None, False
        self._lock = threading.Lock()  # per module: different modules may build at once

    def from_folder(self, folder: Path) -> Native:
        """This kernel built from its same-named source and headers in another folder (an
        earlier version, for a benchmark beside it: bench/gemv.py --baseline)."""
        return Native(self.source, self.cflags, self.needs, folder=Path(folder))

    def supported(self) -> bool:
        flags = cpu_flags()
        return supported() and all(f in flags for f in self.needs)

    def load(self):
        if switched_off():
            return None
        if self._tried:
            return self._module
        with self._lock:
            if not self._tried:
                if self.supported():
                    try:
                        self._module = self._build()
                    except Exception as e:  # no compiler, no ninja, a broken toolchain
                        log.warning(
                            "CPU kernel %s unavailable (%s); using PyTorch ops",
                            self.source,
                            str(e)[:200],
                        )
                self._tried = True
        return self._module

    def _build(self):
        from torch.utils.cpp_extension import load as build

        src = self.folder / self.source
        digest = hashlib.sha256(src.read_bytes())
        for header in sorted(src.parent.glob("*.h")):  # shared headers (vec_avx2.h) count too
            digest.update(header.read_bytes())
        # and the folder: torch's builder rebuilds when the source path in its build file
        # changes, so two checkouts of the same source sharing a name would rebuild in turns
        digest.update(str(src.parent.resolve()).encode())
        name = f"qwen35_{src.stem}_{digest.hexdigest()[:10]}"
        _clear_stale_lock(name)
        if not _built(name):
            log.warning("compiling qwen35's CPU kernel %s (once per machine and version)", src.name)
        return build(
            name=name,
            sources=[str(src)],
            extra_cflags=["-O3", *self.cflags, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def prebuild(natives: list[Native]) -> None:
    """Load these modules at once, a thread each (up to the CPU count): a first build compiles
    each source in one compiler process, 15-20 s apiece (kernels/torch_ext.h), which a CPU
    engine's first step would otherwise wait for in turn. Already-built modules just load; failures are logged by `load`."""
    todo = [n for n in natives if not n._tried and n.supported()]
    workers = min(len(todo), os.cpu_count() or 1)
    if workers < 2:
        for n in todo:
            n.load()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen35-build") as ex:
        list(ex.map(Native.load, todo))


def every_module() -> list[Native]:
    """Every CPU kernel module of the package, the slowest to compile first (gemv_cpu.cpp 41 s
    on a 2-core Zen 3, the others 22-32 s; 206 s one after another)."""
    from qwen35.kernels import attention, fp8, gemv, small_ops
    from qwen35.parallel import shm

    return [gemv.GEMV, attention.ATTENTION, gemv.INT4, DELTANET, shm.SHM, small_ops.SMALL_OPS,
            fp8.FP8, gemv.SCREEN, attention.PREFILL]  # fmt: skip


DELTANET = Native("gated_delta_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"), needs=("avx2", "fma", "f16c"))


def load():
    """The DeltaNet decode module (`deltanet_decode`), or None where it can't be had."""
    return DELTANET.load()


def _clear_stale_lock(name: str) -> None:
    """torch's builder waits forever on a `lock` file a killed build left behind."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale kernel build lock %s (a build was killed)", lock)
            lock.unlink(missing_ok=True)
    except Exception:  # a private helper of torch: without it, torch's own wait applies
        pass


def _built(name: str) -> bool:
    """A previous process already compiled the module (torch's build cache has the .so)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch: if it moves, just say we compile
        return False
