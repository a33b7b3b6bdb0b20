"""gemv_cpu.cpp `moe_bf16`: a MoE block's step for a few bf16 rows in one call (ops/moe.py
`cpu_moe_step`), against its PyTorch twin (layers/moe.py SparseMoE with backend None), and
where the module and the CPU decode plan take it."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import cpu_kernels_or_skip
from qwen35.layers.moe import SparseMoE
from qwen35.ops import moe as ops_moe
from qwen35.ops.backend import select_backend

H, E, K, I, IS = 256, 16, 4, 96, 80  # (I, IS not multiples of 32: the kernels' masked tails)


def _block(seed=0, **kw) -> SparseMoE:
    torch.manual_seed(seed)
    m = SparseMoE(kw.get("hidden", H), kw.get("experts", E), kw.get("top_k", K),
                  kw.get("inter", I), kw.get("shared", IS), dtype=torch.bfloat16)  # fmt: skip
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    m.shared_expert.pack()
    return m


def _mod():
    cpu_kernels_or_skip()
    from qwen35.kernels import gemv

    return gemv.load()


def _call(mod, m: SparseMoE, x, avx2_only=False):
    sh = m.shared_expert
    return mod.moe_bf16(x, m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, m.top_k,
                        m.shared_expert_gate.weight, sh.packed_gate_up, sh.down_proj.weight,
                        avx2_only)  # fmt: skip


@pytest.mark.parametrize("avx2_only", [False, True])
def test_equals_the_module_reference(avx2_only):
    """Every row count 1-16 (experts shared between tokens from 2 on), both the AVX512-BF16
    path and the widening (AVX2) one: the reference module's outputs within bf16 rounding
    (they differ only in the routed sum: fp32 here, bf16 adds there; and libm's exp)."""
    mod = _mod()
    m = _block()
    g = torch.Generator().manual_seed(1)
    for T in range(1, 17):
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        ref = m(x, None)
        got = _call(mod, m, x, avx2_only)
        assert got.dtype == torch.bfloat16 and got.shape == (T, H)
        scale = ref.float().abs().max().item()
        assert (got.float() - ref.float()).abs().max().item() <= 0.01 * scale, T


def test_batched_equals_alone_bitwise():
    mod = _mod()
    m = _block(seed=2)
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([_call(mod, m, x[t : t + 1]) for t in range(16)])
    for T in (2, 3, 4, 5, 8, 16):
        assert torch.equal(_call(mod, m, x[:T]), alone[:T]), T


def test_router_ties_go_to_the_lower_expert_id():
    """Experts 3 and 9 get the same logits (identical router rows) and two of the top 4 places
    with a top_k of 3: expert 3 is picked. Twin: the reference experts on that routing."""
    mod = _mod()
    m = _block(seed=4, top_k=3)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    w = m.gate.weight.data
    w[3] = w[9] = x[0] * 4.0  # the two largest logits, equal
    w[11] = x[0] * 3.9
    w[7] = x[0] * 3.8  # fourth: out with a top_k of 3 only if 3 and 9 both get in
    logits = m.gate(x).float()
    assert logits[0, 3] == logits[0, 9] and logits[0, 3] > logits[0, 11] > logits[0, 7]
    probs = torch.softmax(logits, -1)
    idx = torch.tensor([[3, 9, 11]])
    top_w = probs.gather(1, idx)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(torch.bfloat16)
    sh = m.shared_expert
    want = m.experts(x, idx, top_w) + torch.sigmoid(m.shared_expert_gate(x)) * sh(x)
    torch.testing.assert_close(_call(mod, m, x), want, atol=2e-3, rtol=1e-2)
    # and with the tie at the cut (only one of 3 and 9 fits): the lower id
    m.top_k = 1
    idx1 = torch.tensor([[3]])
    want1 = m.experts(x, idx1, torch.ones(1, 1, dtype=torch.bfloat16)) + torch.sigmoid(
        m.shared_expert_gate(x)) * sh(x)  # fmt: skip
    torch.testing.assert_close(_call(mod, m, x), want1, atol=2e-3, rtol=1e-2)


def test_bad_operands_are_refused_with_a_message():
    mod = _mod()
    m = _block()
    x = torch.randn(2, H).to(torch.bfloat16)
    sh = m.shared_expert
    args = [m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, K,
            m.shared_expert_gate.weight, sh.packed_gate_up, sh.down_proj.weight]  # fmt: skip
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        mod.moe_bf16(torch.zeros(17, H, dtype=torch.bfloat16), *args)
    with pytest.raises(RuntimeError, match="weight shapes"):
        mod.moe_bf16(torch.zeros(2, H + 32, dtype=torch.bfloat16), *args)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D bf16"):
        mod.moe_bf16(x.float(), *args)
    with pytest.raises(RuntimeError, match="top_k"):
        mod.moe_bf16(x, *args[:3], E + 1, *args[4:])


def test_the_module_takes_it_where_it_applies(monkeypatch):
    """SparseMoE.forward with a CPU backend: 1-16 bf16 rows take the one call (same bits as
    calling it), 17 rows the expert loop; no call without a backend, with a LoRA adapter on the
    router, on int8 experts or on fp32 rows (`cpu_step` None / `cpu_moe_takes` False)."""
    _mod()
    be = select_backend("cpu")
    calls = []
    real = ops_moe.cpu_moe_step

    def spy(*a):
        fn = real(*a)
        return None if fn is None else (lambda x: calls.append(len(x)) or fn(x))

    import qwen35.layers.moe as layer_moe

    monkeypatch.setattr(layer_moe, "cpu_moe_step", spy)
    m = _block(seed=6)
    x = torch.randn(17, H, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    for T in (1, 4, 16, 17):
        m(x[:T], be)
    m(x[:2], None)
    m.float()(x[:2].float(), be)
    assert calls == [1, 4, 16]
    assert ops_moe.cpu_moe_takes(x[:16]) and not ops_moe.cpu_moe_takes(x[:16].float())


def test_not_taken_with_lora_on_the_router_or_quantized_experts():
    from types import SimpleNamespace

    from test_backend import _model

    _mod()
    m = _block(seed=8)
    assert m.cpu_step() is not None
    m.gate.lora = SimpleNamespace(active=True)  # (layers/lora.py `adapted`: an active adapter)
    assert m.cpu_step() is None
    m.gate.lora = None
    for quant, taken in ((None, True), ("int8", False), ("fp8", False)):
        model = _model(moe=True, dtype=torch.bfloat16, quant=quant)
        blocks = [b for b in model.modules() if isinstance(b, SparseMoE)]
        assert blocks and all((b.cpu_step() is not None) == taken for b in blocks), quant


@pytest.mark.parametrize("quant", [None, "int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_token_moe_equals_the_loop_on_its_routing(quant, dtype, monkeypatch):
    """ops/moe.py `few_token_moe` (gemv_cpu.cpp `moe_route` + the experts' kernels +
    `moe_combine`) runs a block's routed experts at 1-16 CPU rows for every expert format but
    bf16's plain ones (`cpu_step` there; off here so the plain bf16 experts take it too): the
    per-expert loop's result on the same routing (pairs summed in fp32 here, in the model dtype
    there: tolerance), its routing the reference's but for ties, and batched == alone bit for
    bit (up to the rows where the GEMVs keep a row's bits)."""
    from test_backend import _model

    _mod()
    monkeypatch.setattr(SparseMoE, "cpu_step", lambda self: None)
    runs, real = [], ops_moe.few_token_moe

    def counted(x, *a):
        out = real(x, *a)
        runs.append(None if out is None else len(x))
        return out

    import qwen35.layers.moe as layer_moe

    monkeypatch.setattr(layer_moe, "few_token_moe", counted)
    model = _model(moe=True, dtype=dtype, quant=quant)
    be = select_backend("cpu", dtype=dtype)
    g = torch.Generator().manual_seed(11)
    blocks = [b for b in model.modules() if isinstance(b, SparseMoE)]
    Hm = model.config.hidden_size
    with torch.inference_mode():
        for block in blocks:
            x = torch.randn(16, Hm, generator=g).to(dtype)
            runs.clear()
            fast = {n: block(x[:n], be) for n in (1, 2, 4, 8, 16)}
            alone = torch.cat([block(x[t : t + 1], be) for t in range(16)])
            assert runs == [1, 2, 4, 8, 16] + [1] * 16
            mod = _mod()
            xs, es, ns, w, token = mod.moe_route(x, block.gate.weight, block.top_k)
            k = block.top_k
            idx = torch.tensor(sum(([e] * n for e, n in zip(es, ns, strict=True)), []))  # by pair
            top_idx = torch.empty(16, k, dtype=torch.long)
            top_w = torch.empty(16, k, dtype=dtype)
            fill = [0] * 16
            for q in range(len(token)):
                t = int(token[q])
                top_idx[t, fill[t]], top_w[t, fill[t]] = idx[q], w[q]
                fill[t] += 1
            assert torch.equal(xs, x[token])
            ref_w, ref_idx = block.route(x)  # the module's routing: the same picks (no ties)
            assert torch.equal(ref_idx.sort(-1).values, top_idx.sort(-1).values)
            torch.testing.assert_close(ref_w.sort(-1).values, top_w.sort(-1).values,
                                       atol=0, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)  # fmt: skip
            monkeypatch.setattr(ops_moe, "FEW_TOKENS", 0)  # the loop, on moe_route's routing
            loop = block.experts(x, top_idx, top_w, be)
            monkeypatch.setattr(ops_moe, "FEW_TOKENS", 16)
            sh = block.shared_expert
            want = loop + torch.sigmoid(block.shared_expert_gate(x)) * sh(x, be)
            tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
            torch.testing.assert_close(fast[16], want, atol=tol, rtol=tol)
            # (the shared expert takes a GEMM above 8 bf16 rows; fp32 GEMVs of more than 4 rows
            # run two weight rows a pass, other bits: layers/linear.py, gemv_cpu.cpp)
            for n in (1, 2, 4, 8) if dtype == torch.bfloat16 else (1, 2, 4):
                assert torch.equal(fast[n], alone[:n]), n


def test_moe_combine_refuses_bad_tokens():
    mod = _mod()
    ys = torch.zeros(4, 8, dtype=torch.bfloat16)
    w = torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="token index outside"):
        mod.moe_combine(ys, w, torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(RuntimeError, match="weights \\[P\\] of ys's dtype"):
        mod.moe_combine(ys, w.float(), torch.tensor([0, 1, 2, 3]), 4)
    got = mod.moe_combine(ys + 1, w, torch.tensor([0, 1, 1, 0]), 2)
    assert torch.equal(got, torch.full((2, 8), 2.0, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_row_poisons_only_itself(bad):
    """A NaN / inf in one token's hidden state: that token's output is not finite, the other
    rows' are their bits alone (routing, products and sums are per token), and the call returns
    (no hang, no crash): both the one-call bf16 block and the C++ routing + combine."""
    mod = _mod()
    m = _block(seed=9)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    x[2, 5] = bad
    got = _call(mod, m, x)
    assert not torch.isfinite(got[2]).all()
    for t in (0, 1, 3):
        assert torch.equal(got[t], _call(mod, m, x[t : t + 1])[0]), t
    xs, es, ns, w, token = mod.moe_route(x, m.gate.weight, K)
    assert sum(ns) == 4 * K and sorted(es) == es and len(set(es)) == len(es)
    assert all(0 <= e < E for e in es)
    ys = torch.randn(4 * K, H).to(torch.bfloat16)
    out = mod.moe_combine(ys, w, token, 4)
    keep = token != 2
    assert torch.isfinite(out[[0, 1, 3]]).all() and torch.isfinite(w[keep]).all()
