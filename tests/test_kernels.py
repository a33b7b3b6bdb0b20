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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_deltanet_decode_equals_torch_path(dtype, monkeypatch):
    """A DeltaNet layer's decode step through the compiled kernel equals its PyTorch path:
    outputs, conv states and recurrent states; 3 sequences in slots 2, 3, 5 (two runs, given
    out of slot order), one of them fresh; GQA-like heads (value heads = 2 x key heads)."""
    import json

    import tiny
    from qwen35.config import ModelConfig
    from qwen35.forward_batch import ForwardBatch
    from qwen35.layers import deltanet
    from qwen35.model_caches import StepPlan
    from qwen35.models.qwen3_5 import Qwen35ForCausalLM

    _module()
    cfg = ModelConfig.from_hf(json.loads(tiny.hf_model().config.to_json_string()))
    layer = Qwen35ForCausalLM(cfg, dtype=dtype).model.layers[0].linear_attn
    g = torch.Generator().manual_seed(3)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    batch = ForwardBatch(
        positions=torch.tensor([7, 0, 4]),
        cu_seqlens=[0, 1, 2, 3],
        context_lens=[8, 1, 5],
        slot_mapping=torch.tensor([7, 8, 9]),
        block_tables=torch.zeros(3, 1, dtype=torch.int32),
        state_slots=torch.tensor([5, 2, 3]),
        has_initial_state=[True, False, True],
        logits_indices=torch.arange(3),
    )
    plan = StepPlan.build(batch, 3)
    conv = torch.randn(6, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1, generator=g)
    conv = conv.to(dtype)
    rec = torch.randn(6, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim, generator=g) * 0.1  # fmt: skip
    x = torch.randn(3, cfg.hidden_size, generator=g).to(dtype)
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    with torch.no_grad():
        out_k = layer(x, plan, c1, r1)
        monkeypatch.setattr(deltanet, "_fused_decode", lambda rec_cache: None)
        out_t = layer(x, plan, c2, r2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_k, out_t, **tol)
    torch.testing.assert_close(c1, c2, **tol)
    torch.testing.assert_close(r1, r2, **tol)
    assert not torch.equal(r1, rec)  # the states did move
