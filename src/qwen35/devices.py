"""What the device can do, and the dtype `--dtype auto` picks from it.

On a GPU the answer is bf16. On a CPU it depends on the silicon: with native bf16 arithmetic
(Intel AMX or AVX512-BF16) bf16 matmuls are much faster than fp32 ones and read half the bytes,
so bf16 wins everywhere. Without it (AVX2 only, e.g. AMD Zen 3) bf16 matmuls are emulated and
slower than fp32, so fp32 compute is the default there, on weights kept in bf16 when the
checkpoint stores them so (`default_quantization`). The measurements are in the README ("Dtype");
`qwen35 bench --workload dtype` repeats them on any machine.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# QWEN35_CPU_ISA=avx2 hides the flags with these prefixes (kernels/cpu_isa.h: the same for the
# compiled kernels), so what a CPU without AVX512 runs can be measured on any x86-64 machine
AVX2_HIDES = ("avx512", "amx")


def avx2_forced() -> bool:
    return os.environ.get("QWEN35_CPU_ISA") == "avx2"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS), less
    the AVX512 and AMX ones under QWEN35_CPU_ISA=avx2 (`AVX2_HIDES`)."""
    flags: frozenset[str] = frozenset()
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
    if avx2_forced():
        flags = frozenset(f for f in flags if not f.startswith(AVX2_HIDES))
    return flags


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("AuthenticAMD", "GenuineIntel"; "" where there is none)."""
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return ""


def cpu_has_native_bf16() -> bool:
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def cpu_has_amx() -> bool:
    """AMX tiles (Sapphire Rapids and later): torch's bf16 GEMMs run on them, so the paths that
    beat its GEMM elsewhere (int4 prefill, lm_head chunks) keep it here (unmeasured against it)."""
    return any(f.startswith("amx") for f in cpu_flags())


def default_dtype(device: str) -> str:
    """`--dtype auto`: bf16 on a GPU and on a CPU with native bf16, fp32 on other CPUs."""
    if not str(device).startswith("cpu"):
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def dtype_advice(dtype: str, device: str) -> str | None:
    """A warning for an explicit `--dtype bf16` on a CPU without native bf16 arithmetic, where
    torch's bf16 GEMMs are emulated (README "Dtype": prefill several times slower than `auto`,
    which computes in fp32 on the same bf16 weights); None otherwise."""
    if dtype != "bf16" or not str(device).startswith("cpu") or cpu_has_native_bf16():
        return None
    return (
        "--dtype bf16 on a CPU without native bf16 arithmetic (no AVX512-BF16 / AMX): torch's "
        "bf16 matmuls are emulated here and prefill runs several times slower than with "
        "--dtype auto, which computes in fp32 on the same bf16 weights (same memory)"
    )


def resolve_dtype(dtype: str, device: str) -> str:
    return default_dtype(device) if dtype == "auto" else dtype


def resolve_kv_dtype(
    kv_cache_dtype: str, model_dtype: str, device: str, stored_below_fp32: bool = False
) -> str:
    """The K/V cache's dtype name ("float32", "bfloat16", "float16") for `--kv-cache-dtype`.
    auto: the model's compute dtype, but bf16 for an fp32 model on a CPU whose weights are
    stored below fp32 (bf16 / int8 / int4 / FP8: what `--dtype auto` runs on a CPU without
    native bf16), as a bf16 model's cache would be: half the memory, and half the bytes a long
    context reads per decoded token (README "KV cache dtype"). Another is taken where the
    kernels read it (a CPU, an fp32 model: its query against bf16 / fp16 caches,
    ops/attention.py), else refused. fp8 ("float8_e4m3fn": values stored as they are, no scale,
    saturating at +-448) goes under any model dtype, on a CPU and on a GPU: every attention path
    widens it to the model dtype as it reads (C++ and Triton kernels, the PyTorch reference)."""
    from qwen35.errors import Qwen35Error

    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}
    model = str(model_dtype).removeprefix("torch.")
    if kv_cache_dtype == "auto":
        cpu = str(device).startswith("cpu")
        return "bfloat16" if cpu and model == "float32" and stored_below_fp32 else model
    kv = names.get(kv_cache_dtype, kv_cache_dtype)
    if kv not in names.values():
        raise Qwen35Error(
            f"--kv-cache-dtype must be auto, fp32, bf16, fp16 or fp8, got {kv_cache_dtype!r}"
        )
    if kv == model or kv == "float8_e4m3fn":
        return kv
    if not str(device).startswith("cpu"):
        raise Qwen35Error(
            f"--kv-cache-dtype {kv_cache_dtype} under a {model} model runs on a CPU only (the GPU "
            "kernels read caches of the model's dtype): drop it, or use auto"
        )
    if model != "float32":
        raise Qwen35Error(
            f"--kv-cache-dtype {kv_cache_dtype} under a {model} model: the cache holds the "
            "model's dtype, fp8 under any model, or bf16 / fp16 under an fp32 model (--dtype "
            "fp32, or auto on a CPU without native bf16); use auto or fp8"
        )
    return kv


def resolve_state_dtype(mamba_ssm_cache_dtype: str, config_dtype: str = "float32") -> str:
    """The DeltaNet recurrent states' dtype name for `--mamba-ssm-cache-dtype`: auto is the
    checkpoint's mamba_ssm_dtype (fp32 in every Qwen 3.5 release); fp32 or bf16 as asked. The
    states are computed in fp32 either way; bf16 rounds what each step stores."""
    from qwen35.errors import Qwen35Error

    names = {"fp32": "float32", "bf16": "bfloat16"}
    if mamba_ssm_cache_dtype == "auto":
        got = names.get(config_dtype, config_dtype)
    else:
        got = names.get(mamba_ssm_cache_dtype, "")
    if got not in names.values():
        raise Qwen35Error(
            f"--mamba-ssm-cache-dtype must be auto, fp32 or bf16, got {mamba_ssm_cache_dtype!r}"
            + (f" (auto: the checkpoint's mamba_ssm_dtype {config_dtype!r})"
               if mamba_ssm_cache_dtype == "auto" else "")  # fmt: skip
        )
    return got


def model_kv_dtype(model, device: str, kv_cache_dtype: str = "auto") -> str:
    """resolve_kv_dtype for a loaded model (its compute dtype, and whether its weights are
    stored below fp32: a quantized / bf16-stored model or an FP8 checkpoint)."""
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    stored = getattr(model, "quantization", None) or model.config.quantization
    return resolve_kv_dtype(kv_cache_dtype, str(dtype), device, bool(stored))


def default_quantization(
    dtype: str, device: str, quantization: str | None, stored_dtype: str
) -> str | None:
    """The weight storage `--dtype auto` goes with: where it computes in fp32 (a CPU without
    native bf16), a checkpoint stored in BF16 keeps its weights in bf16 ("bf16": the very
    values fp32 would widen them to, half the memory, 1.05-1.7x fp32's decode, fp32's prefill,
    README "Dtype"). Anything chosen explicitly (a dtype, a quantization) is kept."""
    if (
        quantization is None
        and dtype == "auto"
        and str(device).startswith("cpu")
        and default_dtype(device) == "fp32"
        and stored_as_bf16(stored_dtype)
        and _bf16_rows_kernel()
    ):
        return "bf16"
    return quantization


def stored_as_bf16(name: str) -> bool:
    """A stored dtype's name (a config's "bfloat16", torch's "torch.bfloat16", safetensors'
    "BF16") says bf16."""
    return str(name).lower().removeprefix("torch.") in ("bfloat16", "bf16")


def _bf16_rows_kernel() -> bool:
    """Our GEMV kernel runs here (x86-64 with AVX2 + FMA, built): it reads bf16 weights for fp32
    decode rows. Without it every decode step would widen each matrix first, slower than fp32."""
    from qwen35.kernels import gemv

    return gemv.load() is not None


def weights_label(dtype: str, quantization: str | None) -> str:
    """'float32', 'bfloat16', 'float32+bf16' (fp32 compute on bf16 weights), 'float32+int8'..."""
    return dtype + (f"+{quantization}" if quantization else "")
