"""`--dtype auto` follows the silicon: bf16 on a GPU or a CPU with native bf16, else fp32."""

from __future__ import annotations

import platform
import sys

import pytest

from qwen35 import devices


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "fma"}, "fp32"),  # AMD Zen 3: bf16 matmuls are emulated, ~4x slower
        ({"avx512f", "avx512bw"}, "fp32"),  # AVX-512 without bf16 arithmetic
        ({"avx512f", "avx512_bf16"}, "bf16"),
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids and later
    ],
)
def test_cpu_default_follows_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    assert devices.default_dtype("cpu") == expected
    assert devices.resolve_dtype("auto", "cpu") == expected
    assert devices.resolve_dtype("fp32", "cpu") == "fp32"  # explicit choices are kept


@pytest.mark.parametrize(
    "flags, dtype, device, warns",
    [
        ({"avx2", "fma"}, "bf16", "cpu", True),  # Zen 3: bf16 GEMMs emulated
        ({"avx2", "fma"}, "auto", "cpu", False),  # auto computes in fp32 there
        ({"avx2", "fma"}, "fp32", "cpu", False),
        ({"avx2", "fma"}, "bf16", "cuda", False),
        ({"avx512f", "avx512_bf16"}, "bf16", "cpu", False),
    ],
)
def test_explicit_bf16_on_a_cpu_without_native_bf16_is_advised_against(
    monkeypatch, flags, dtype, device, warns
):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    advice = devices.dtype_advice(dtype, device)
    assert (advice is not None) == warns
    if warns:
        assert "--dtype auto" in advice and "native bf16" in advice


def test_gpu_default_is_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset())
    assert devices.default_dtype("cuda") == "bf16"
    assert devices.default_dtype("cuda:1") == "bf16"


X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(
    not X86_LINUX,
    reason=f"cpu_flags reads the 'flags' line of x86 Linux /proc/cpuinfo; this is "
    f"{sys.platform} {platform.machine()}, where it is empty and --dtype auto picks fp32",
)
def test_cpu_flags_read_from_this_machine():
    flags = devices.cpu_flags()
    assert isinstance(flags, frozenset)
    assert "sse2" in flags, sorted(flags)[:20]  # every x86-64 CPU has it: the line was read
