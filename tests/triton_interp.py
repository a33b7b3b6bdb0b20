"""Running the GPU backend's Triton kernels on a CPU through Triton's interpreter (tests only).

The default test environment has no Triton (with Triton and fla-core present, transformers routes
its reference to GPU kernels). The slow interpreter tests run in a separate venv:

    python -m venv /work/venvs/gpu
    /work/venvs/gpu/bin/pip install torch==2.13.0 triton numpy pytest fla-core==0.6.0 einops \\
        transformers
    /work/venvs/gpu/bin/pip install -e .  # the project's own dependencies (llguidance, ...)
    TRITON_INTERPRET=1 PYTHONPATH=src /work/venvs/gpu/bin/python -m pytest -m slow \\
        tests/test_triton_kernels.py tests/test_interpret_engine.py -p no:cacheprovider

`skip_unless_interpretable()` skips a module where Triton is missing or not interpreted (or a GPU
is there: the `gpu` tests run the compiled kernels). `patch_fla_for_interpreter()` makes fla-core
0.6's kernels run interpreted; two things stand in the way, neither touching the arithmetic:
- its autotuned kernels benchmark every config, which needs a GPU driver: the first config is
  taken (configs change tile sizes and warps, not results), untimed and not looked up in
  Triton's disk cache of tuning results (both need the driver on triton 3.6);
- its kernels loop `for i_t in range(NT)` and call `i_t.to(tl.int64)`: compiled, a loop variable
  is a Triton scalar; the interpreter hands out Python ints. Inside an interpreted kernel, the
  `range` of fla's kernel modules yields interpreter scalars instead (outside, the builtin).
"""

from __future__ import annotations

import builtins
import os
import sys

import pytest
import torch


def skip_unless_interpretable() -> None:
    pytest.importorskip("triton", reason="Triton is not installed (see tests/triton_interp.py)")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_gpu.py runs the compiled kernels",
                    allow_module_level=True)  # fmt: skip
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels interpreted on the CPU",
                    allow_module_level=True)  # fmt: skip


_patched = False


def patch_fla_for_interpreter() -> bool:
    """Patch once; False where fla-core is not importable."""
    global _patched
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    if _patched:
        return True
    import triton
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    autotuner.Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]
    # triton 3.6 still "benchmarks" the one config left, and looks up its disk cache of tuning
    # results, both through the GPU driver: neither is needed to take the first config
    autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]
    autotuner.Autotuner.check_disk_cache = lambda self, key, configs, bench_fn: bench_fn() and False
    builtin_tl_range = tl.range  # the interpreter swaps tl.range only while a kernel runs

    def kernel_range(*args):
        if tl.range is builtin_tl_range:  # host code of the same module
            return builtins.range(*args)
        return (interpreter._implicit_cvt(i) for i in builtins.range(*map(_int, args)))

    def _int(a) -> int:  # an interpreter scalar holds a 1-element array (numpy 2 refuses int())
        data = getattr(getattr(a, "handle", None), "data", a)
        return int(data.item() if hasattr(data, "item") else data)

    kinds = (triton.runtime.JITFunction, autotuner.Autotuner, autotuner.Heuristics)
    for name, mod in list(sys.modules.items()):
        if name.startswith("fla.") and mod is not None:
            if any(isinstance(v, kinds) for v in vars(mod).values()):
                mod.range = kernel_range
    _patched = True
    return True
