"""The compiled CPU kernels (`qwen35.kernels`) in tests: a module, or a skip that says why; and
the comparisons several kernel tests share."""

from __future__ import annotations

import pytest
import torch

from qwen35.kernels import Native


def native_or_skip(native: Native, what: str):
    """`native`'s module; skips the test where this CPU lacks its instructions, kernels are
    switched off, or it did not build."""
    if not native.supported():
        needs = " + ".join(n.upper() for n in native.needs)
        pytest.skip(f"{what} needs x86-64 with {needs} (or QWEN35_NO_KERNELS is set)")
    m = native.load()
    if m is None:
        pytest.skip(f"{what} did not build here (no compiler or ninja): see the warning")
    return m


def cpu_kernels_or_skip() -> None:
    """Skips a test about what the compiled CPU kernels do where they don't run here (no
    compiler, a CPU without AVX2 + FMA, or QWEN35_NO_KERNELS set: the PyTorch paths run)."""
    from qwen35.kernels import gemv

    if gemv.load() is None:
        pytest.skip("needs the compiled CPU kernels: none here (no compiler / AVX2, or "
                    "QWEN35_NO_KERNELS is set)")  # fmt: skip


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms, fp32)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rows_alone_mismatches(linear, x: torch.Tensor, counts=(2, 3, 4, 5, 8, 9, 16)) -> dict:
    """{M: outputs of x[:M] through `linear` that differ from the same row computed alone}."""
    alone = [linear(x[i : i + 1]) for i in range(max(counts))]
    out = {}
    for m in counts:
        y = linear(x[:m])
        out[m] = sum(int((y[i] != alone[i][0]).sum()) for i in range(m))
    return out
