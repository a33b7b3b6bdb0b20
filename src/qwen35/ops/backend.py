"""The backend seam: which implementation of each op an engine uses, chosen once.

`select_backend(device)` looks at the device and at what is importable and working (the
compiled CPU kernel, fla-core's Triton kernels, Triton itself, `torch._grouped_mm`) and returns
a frozen `Backend`. The runner picks it once per engine and hands it to the model with every
`ForwardBatch`; each op in `ops/` has one dispatch function that reads it (no `is_cpu` checks in
the layers). Tests pick a backend instead of monkeypatching:

    select_backend("cpu")                  # the compiled CPU kernels where they build
    select_backend("cpu", kernels=False)   # plain PyTorch everywhere: the reference
    select_backend("cuda")                 # fla + Triton paged attention where installed
    interpreter_backend(torch.float32)     # tests only: the cuda backend's kernels on CPU
                                           # tensors, through Triton's interpreter

The plain PyTorch path runs on every device; each fast op is tested against it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from qwen35.kernels.unavailable import KernelUnavailable, launcher

log = logging.getLogger("qwen35")


@dataclass(frozen=True)
class Backend:
    device_type: str  # "cpu" or "cuda"
    cpu_kernels: Any = None  # the compiled CPU module (kernels/) when it loaded, or None
    # the fused small ops on the CPU (kernels/small_ops.py: norms, SiLU * mul, DeltaNet gates)
    cpu_small_ops: Any = None
    cpu_attention: Any = None  # paged decode attention on the CPU (kernels/attention.py)
    # causal prefill attention of bf16 / fp32 models over the paged cache (kernels/attention.py)
    cpu_prefill_attention: Any = None
    fla: Any = None  # fla-core's ops (namespace: chunk, fused_recurrent, conv or None), or None
    triton_attention: bool = False  # our Triton paged attention (kernels/triton_attention.py)
    # the two RMSNorms and residual add + RMSNorm as Triton kernels (kernels/triton_norms.py)
    triton_norms: bool = False
    # rotary on q and k, SiLU * mul as Triton kernels (kernels/triton_pointwise.py)
    triton_pointwise: bool = False
    # DeltaNet decode in Triton, states updated in their slots (kernels/triton_deltanet.py)
    triton_deltanet: bool = False
    grouped_mm: bool = False  # torch._grouped_mm works for the model dtype on this device
    # the MoE block of a few tokens in three Triton kernels (kernels/triton_moe.py)
    triton_moe: bool = False
    # a prefill chunk after a cached prefix on the GPU path (ops/attention.py
    # cached_prefill_attention): "triton", our paged kernel reading the cache in place, or
    # "sdpa", the context gathered and torch's SDPA with a bottom-right causal bias
    # (FlashAttention); engine/preflight.py times both at start and takes the faster
    chunk_attention: str = "triton"
    # tests only (interpreter_backend): the Triton kernels also take CPU tensors, which Triton
    # runs through its interpreter (TRITON_INTERPRET=1), and ops choose as they would on a GPU
    interpret: bool = False

    def on_gpu_path(self, x: torch.Tensor) -> bool:
        """x takes this backend's GPU kernels: it is on the GPU, or the kernels are interpreted."""
        return x.is_cuda or self.interpret

    @property
    def name(self) -> str:
        parts = [self.device_type]
        if self.cpu_kernels is not None:
            parts.append("cpu-kernels")
        if self.cpu_small_ops is not None:
            parts.append("cpu-small-ops")
        if self.cpu_attention is not None:
            parts.append("cpu-attention")
        if self.cpu_prefill_attention is not None:
            parts.append("cpu-prefill-attention")
        if self.fla is not None:
            parts.append("fla")
        if self.triton_attention:
            parts.append("triton-attention")
            if self.chunk_attention == "sdpa":  # prefill chunks after a cached prefix: SDPA
                parts.append("sdpa-chunks")
        if self.triton_norms:
            parts.append("triton-norms")
        if self.triton_pointwise:
            parts.append("triton-pointwise")
        if self.triton_deltanet:
            parts.append("triton-deltanet")
        if self.grouped_mm:
            parts.append("grouped-mm")
        if self.triton_moe:
            parts.append("triton-moe")
        if self.interpret:
            parts.append("interpreted")
        return "+".join(parts)

    @property
    def can_capture(self) -> bool:
        """A decode step runs without host syncs (CUDA graphs possible): the paged attention
        and the MoE routing must then read only device tensors."""
        return self.device_type == "cuda" and self.triton_attention

    def without(self, e: KernelUnavailable) -> Backend:
        """This backend with e's kernel family off (its ops take the PyTorch path), logged."""
        log.warning("%s; its ops run in PyTorch on this GPU (slower)", e)
        return dataclasses.replace(self, **{e.field: None if e.field == "fla" else False})


def with_fallbacks(backend: Backend, run):
    """(backend, run(backend)), run again with each kernel family off that raises
    KernelUnavailable (kernels/unavailable.py): the kernels this GPU cannot build."""
    while True:
        try:
            return backend, run(backend)
        except KernelUnavailable as e:
            if not getattr(backend, e.field, None):  # already off: not a family this switches
                raise
            backend = backend.without(e)


def select_backend(
    device: torch.device | str, *, kernels: bool = True, dtype: torch.dtype | None = None
) -> Backend:
    """The fastest working backend for `device` (kernels=False: the plain PyTorch reference).
    `dtype`: the model dtype, for the probes that depend on it (default bf16)."""
    dev = torch.device(device)
    return _select(dev.type, kernels, dtype or torch.bfloat16)


def reference_backend(device: torch.device | str) -> Backend:
    return select_backend(device, kernels=False)


def interpreter_backend(dtype: torch.dtype = torch.float32, **overrides) -> Backend:
    """Tests only: the cuda backend's choice of kernels (fla-core where importable, our Triton
    attention, norms, pointwise ops and DeltaNet decode, grouped-mm MoE) over CPU tensors, every Triton kernel
    run by Triton's interpreter. Needs TRITON_INTERPRET=1 set before Triton is imported (a
    compiled launch on a CPU tensor fails). fla is taken for fp32 too: interpreted dots are
    exact fp32, unlike the TF32 a GPU uses. `overrides`: Backend fields to change (a subset)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpreter_backend needs TRITON_INTERPRET=1 (set before import)")
    import triton  # noqa: F401  (ImportError: no Triton here)

    from qwen35.kernels import (  # noqa: F401
        triton_attention,
        triton_deltanet,
        triton_moe,
        triton_norms,
        triton_pointwise,  # noqa: F401
    )

    fields = dict(
        fla=load_fla(),
        triton_attention=True,
        triton_norms=True,
        triton_pointwise=True,
        triton_deltanet=True,
        grouped_mm=_grouped_mm_works("cpu", dtype),
        triton_moe=True,
        interpret=True,
    )
    return Backend("cuda", **{**fields, **overrides})


@functools.cache
def _select(device_type: str, kernels: bool, dtype: torch.dtype) -> Backend:
    if not kernels:
        return Backend(device_type)
    if device_type == "cpu":
        from qwen35 import kernels as cpu_kernels
        from qwen35.kernels import attention, gemv, small_ops

        # the modules every CPU step uses, compiled side by side on a machine's first run
        cpu_kernels.prebuild(
            [cpu_kernels.DELTANET, small_ops.SMALL_OPS, attention.ATTENTION, gemv.GEMV,
             gemv.SCREEN, attention.PREFILL]  # fmt: skip
        )
        return Backend(
            "cpu",
            cpu_kernels=cpu_kernels.load(),
            cpu_small_ops=small_ops.load(),
            cpu_attention=attention.load(),
            cpu_prefill_attention=attention.load_prefill(),
            grouped_mm=_grouped_mm_works("cpu", dtype),
        )
    if device_type == "cuda":
        triton_ok = _triton_works()
        be = Backend(
            "cuda",
            # fla's Triton dots run TF32 on fp32 inputs (~1e-3): fp32 models (tests, references)
            # keep the exact PyTorch DeltaNet path; bf16 / fp16 ones get fla
            fla=load_fla() if dtype != torch.float32 else None,
            triton_attention=triton_ok,
            triton_norms=triton_ok,
            triton_pointwise=triton_ok,
            triton_deltanet=triton_ok,
            grouped_mm=_grouped_mm_works("cuda", dtype),
            triton_moe=triton_ok,
        )
        log.info("GPU backend: %s", be.name)
        return be
    return Backend(device_type)


def load_fla():
    """fla-core's gated delta rule kernels (the `qwen35[gpu]` extra), or None. On a GPU with
    configs shipped in kernels/fla_configs/, fla takes them instead of autotuning at start."""
    try:
        from qwen35.kernels import fla_configs

        fla_configs.use_shipped()
    except Exception as e:  # (no CUDA device to name: fla autotunes as it would)
        log.info("fla-core configs not set (%s)", str(e)[:120])
    try:
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except Exception as e:  # not installed, or no Triton / GPU to import against
        log.info("fla-core not available (%s): DeltaNet runs in PyTorch", str(e)[:120])
        return None
    try:  # the varlen causal conv of the prefill (fla.modules); without it, ours per sequence
        from fla.modules.causal_conv1d import causal_conv1d
    except Exception as e:
        log.info("fla's causal_conv1d not available (%s)", str(e)[:120])
        causal_conv1d = None
    from types import SimpleNamespace

    fla = launcher("fla")  # its kernels' build errors: KernelUnavailable("fla")
    return SimpleNamespace(
        chunk=fla(chunk_gated_delta_rule),
        fused_recurrent=fla(fused_recurrent_gated_delta_rule),
        conv=fla(causal_conv1d) if causal_conv1d is not None else None,
    )


def _triton_works() -> bool:
    try:
        import triton  # noqa: F401

        from qwen35.kernels import (  # noqa: F401
            triton_attention,
            triton_deltanet,
            triton_moe,
            triton_norms,
            triton_pointwise,  # noqa: F401
        )
    except Exception as e:
        log.info("Triton not available (%s): paged attention gathers in PyTorch", str(e)[:120])
        return False
    return torch.cuda.is_available()


def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """One tiny torch._grouped_mm call checked against per-group matmuls (the op is private
    and its device / dtype coverage differs between torch versions and GPUs)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or (device_type == "cuda" and not torch.cuda.is_available()):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(5, 16, generator=g).to(device_type, dtype)
        w = torch.randn(2, 8, 16, generator=g).to(device_type, dtype)  # [E, N, K]
        offs = torch.tensor([2, 5], dtype=torch.int32, device=device_type)
        out = fn(a, w.transpose(1, 2), offs=offs)
        ref = torch.cat([a[:2] @ w[0].T, a[2:] @ w[1].T])
        return bool(torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2))
    except Exception:
        return False
