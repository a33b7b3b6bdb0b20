"""The block-FP8 CPU kernels (`fp8_cpu.cpp`), compiled on first use like the DeltaNet kernel.

- `fp8_linear(x [M<=16, K], w [N, K] fp8, scale [nbo, nbi] fp32, bo, bi) -> y [M, N]`: decode
  rows read the FP8 weight directly (1 byte per weight from memory);
- `fp8_dequant(w, scale, out, bo, bi)`: the weight in out's dtype (prefill's GEMM input).
Their PyTorch twins are `qwen35.quant.formats.dequantize_fp8_blocks` (+ `F.linear`); callers use
those when `load()` returns None (no compiler, no AVX2/F16C, QWEN35_NO_KERNELS=1).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from qwen35.devices import cpu_flags
from qwen35.kernels import _built, _clear_stale_lock, supported

log = logging.getLogger("qwen35")
NAME = "qwen35_fp8_cpu"
MAX_ROWS = 16  # rows fp8_linear takes; longer inputs dequantise and run a GEMM

_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled module or None (a failed build is logged once)."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            if supported() and "f16c" in cpu_flags():
                try:
                    _module = _build()
                except Exception as e:  # no compiler / ninja: the PyTorch path serves
                    log.warning("FP8 CPU kernel unavailable (%s); using PyTorch ops", str(e)[:200])
            _tried = True
    return _module


def _build():
    from torch.utils.cpp_extension import load as build

    src = Path(__file__).with_name("fp8_cpu.cpp")
    name = f"{NAME}_{hashlib.sha256(src.read_bytes()).hexdigest()[:10]}"  # per source version
    _clear_stale_lock(name)
    if not _built(name):
        log.warning("compiling qwen35's FP8 CPU kernel (once per machine and version, ~30 s)")
    return build(
        name=name,
        sources=[str(src)],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
