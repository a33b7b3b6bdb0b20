"""The small per-token ops of a forward step fused on the CPU (`small_ops_cpu.cpp`):

- `rms_norm_zc(x, w, eps)`, `add_rms_norm_zc_(h, delta, w, eps)`: layers/norms.py's RMSNorm;
- `gated_rms_norm(x, z, w, eps)`: the DeltaNet output norm;
- `silu_mul(gate, up)`: SwiGLU's activation (ops/pointwise.py);
- `deltanet_gates(a, b, dt_bias, A_log) -> (g fp32, beta)`: layers/deltanet.py;
- `rotary_qk_(q, k, cos, sin)`: partial NeoX rotary of q and k in place (layers/rotary.py).
- `argmax_rows(x)`: the first index of each fp32 row's maximum (engine/sampler.py's argmax);
- `causal_conv1d_silu(x, w, state=None)`: DeltaNet's causal conv + SiLU over a prefill chunk
  (ops/deltanet.py; reference: ops/conv.py causal_conv1d).

Each replaces a chain of 4-12 PyTorch ops by one call (at batch-1 decode the step is bound by
per-op dispatch: bench/small_ops.py). Their PyTorch references stay beside the dispatch and
`tests/test_small_ops.py` checks each against its reference.
"""

from __future__ import annotations

import torch

from qwen35.kernels import Native

SMALL_OPS = Native("small_ops_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"), needs=("avx2", "fma", "f16c"))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load():
    """The compiled module or None (no compiler, QWEN35_NO_KERNELS=1, a CPU without AVX2)."""
    return SMALL_OPS.load()


def for_backend(backend, x: torch.Tensor):
    """The module when `backend` carries it (a CPU backend with kernels) and x is a CPU tensor
    of a floating dtype it handles; None otherwise (the caller runs its PyTorch reference)."""
    if backend is None or backend.cpu_small_ops is None or not x.is_cpu or x.dtype not in DTYPES:
        return None
    return SMALL_OPS.load()  # None once QWEN35_NO_KERNELS=1 is set, at any time
