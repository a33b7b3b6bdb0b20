"""GPU kernels that cannot be built on the GPU at hand: a switch to the PyTorch path, not a crash.

Our Triton kernels (and fla-core's) compile where they first run, for that GPU. Not every GPU
can build every kernel: Triton has e4m3 (the FP8 checkpoints' weights) only from sm_89 (Ada,
Hopper) on, so on an A100 every kernel that reads FP8 weights fails to compile; a tile sized
for an H200 can need more shared memory than a smaller GPU has (OutOfResources). Triton raises
these while compiling or loading the kernel, before it launches, so nothing has been written.

`launcher(field)` wraps the public launchers of one `Backend` field (ops/backend.py:
"triton_attention", "triton_norms", "triton_pointwise", "triton_deltanet", "triton_moe",
"fla"): such an error becomes `KernelUnavailable(field)`. `ops.backend.with_fallbacks` turns
the field off and runs again: the engine's start-up check (engine/preflight.py) does that on
scratch caches, so a GPU that lacks a kernel family serves from the PyTorch path with one
warning that says which kernels and why. Any other error (a wrong shape, a CUDA fault) passes
through unchanged.
"""

from __future__ import annotations

import functools


class KernelUnavailable(RuntimeError):
    """A kernel of Backend field `field` does not build on this GPU (nothing was launched)."""

    def __init__(self, field: str, kernel: str, reason: BaseException | str):
        self.field, self.kernel = field, kernel
        self.reason = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) \
            else reason  # fmt: skip
        first = self.reason.strip().splitlines()[-1] if self.reason.strip() else ""
        super().__init__(
            f"GPU kernel {kernel} ({field}) cannot be built on this GPU: {first[:300]}"
        )


def is_build_error(e: BaseException) -> bool:
    """Triton's compile / load errors (CompilationError, OutOfResources, PTXASError: all
    TritonError) and its MLIR pass failures; not CUDA faults, argument errors or what a kernel
    raises under TRITON_INTERPRET=1."""
    names = {c.__name__ for c in type(e).__mro__}
    if "TritonError" in names:  # (its interpreter's errors are a kernel's bugs, not the GPU's)
        return "InterpreterError" not in names
    return isinstance(e, RuntimeError) and "PassManager::run failed" in str(e)


def launcher(field: str):
    """Decorator: the wrapped launcher's build errors become KernelUnavailable(field)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KernelUnavailable:
                raise
            except Exception as e:
                if is_build_error(e):
                    raise KernelUnavailable(field, fn.__name__, e) from e
                raise

        return run

    return wrap
