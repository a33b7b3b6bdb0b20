"""The compiled CPU kernel (qwen35.kernels) against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from qwen35 import kernels
from qwen35.ops.gated_delta import gated_delta_step_, gated_delta_step_torch


def _module():
    if not kernels.supported():
        pytest.skip("CPU kernels need x86-64 with AVX2 + FMA (or QWEN35_NO_KERNELS is set)")
    mod = kernels.load()
    if mod is None:
        pytest.skip("the CPU kernel did not build here (no compiler or ninja): see the warning")
    return mod


def _inputs(N, H=4, dk=16, dv=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(N, H, dk, generator=g), dim=-1) * dk**-0.5
    k = torch.nn.functional.normalize(torch.randn(N, H, dk, generator=g), dim=-1)
    v = torch.randn(N, H, dv, generator=g).bfloat16()  # the model dtype, as the layer passes it
    a = torch.rand(N, H, generator=g)
    beta = torch.rand(N, H, generator=g).bfloat16()
    S = torch.randn(N, H, dk, dv, generator=g)
    return q, k, v, a, beta, S


def test_fused_step_equals_torch_reference():
    _module()
    q, k, v, a, beta, S = _inputs(5)
    S_ref, S_k = S.clone(), S.clone()
    for _ in range(3):  # three decode steps in a row: the states stay equal
        o_ref = gated_delta_step_torch(q, k, v, a, beta, S_ref)
        o = gated_delta_step_(q, k, v, a, beta, S_k)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S_k, S_ref, atol=1e-5, rtol=1e-5)


def test_fused_step_is_batch_independent():
    """Each head's arithmetic is the same in any batch: bitwise equal to running alone."""
    _module()
    q, k, v, a, beta, S = _inputs(4, seed=1)
    S_all = S.clone()
    o_all = gated_delta_step_(q, k, v, a, beta, S_all)
    for i in range(4):
        S_i = S[i : i + 1].clone()
        o_i = gated_delta_step_(q[i : i + 1], k[i : i + 1], v[i : i + 1], a[i : i + 1],
                                beta[i : i + 1], S_i)  # fmt: skip
        assert torch.equal(o_i[0], o_all[i]) and torch.equal(S_i[0], S_all[i])


def test_bad_input_is_refused():
    mod = _module()
    q, k, v, a, beta, S = _inputs(2)
    out = torch.empty(2 * 4, 24)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        mod.gated_delta_step(q.view(8, 16), k.view(8, 16), v.view(8, 24), a.view(8),
                             beta.view(8), S.view(8, 16, 24), out)  # v, beta are bf16  # fmt: skip


def test_switch_off(monkeypatch):
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    assert kernels.supported() is False
