"""fp32 compute on bf16-stored weights (`--quantization bf16`, and `--dtype auto` on CPUs
without native bf16): the GEMV kernel's fp32-row path against its reference, the model equal to
an fp32 model of the same BF16 checkpoint, the engine's tokens equal to fp32's (batched ==
alone), and the default it becomes where fp32 is the compute dtype."""

from __future__ import annotations

import json

import pytest
import torch

from kernel_modules import native_or_skip, rows_alone_mismatches
from qwen35 import LLM, devices
from qwen35.errors import Qwen35Error
from qwen35.kernels import gemv
from qwen35.layers.linear import linear
from qwen35.loader import load_model
from qwen35.request import SamplingParams
from tiny import save_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, kw in (("dense", {}), ("moe", {"moe": True}),
                     ("tied", {"tie_word_embeddings": True})):  # fmt: skip
        d = tmp_path_factory.mktemp(name)
        save_checkpoint(d, dtype=torch.bfloat16, **kw)
        out[name] = d
    return out


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize("N,K", [(70, 333), (64, 64), (130, 1030)])
def test_kernel_fp32_rows_on_bf16_weights(avx2_only, N, K):
    mod = native_or_skip(gemv.GEMV, "the gemv kernel")
    g = torch.Generator().manual_seed(N + K)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    x = torch.randn(16, K, generator=g)
    for M in (1, 2, 3, 4, 5, 16):
        y = mod.linear_bf16(x[:M].contiguous(), w, avx2_only)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, x[:M] @ w.float().T, atol=1e-5, rtol=1e-5)
    # up to 4 rows a row's sum does not depend on the rows beside it (batched == alone); more
    # rows are compute-bound and take linear_fp32's pairs of weight rows, as fp32 weights do
    fn = lambda v: mod.linear_bf16(v.contiguous(), w, avx2_only)  # noqa: E731
    mism = rows_alone_mismatches(fn, x, counts=(2, 3, 4))
    assert not any(mism.values()), mism
    for M in (3, 16):  # the same paths as fp32 weights (up to the scalar tail's rounding)
        f32 = mod.linear_fp32(x[:M].contiguous(), w.float().contiguous(), avx2_only)
        torch.testing.assert_close(fn(x[:M]), f32, atol=1e-6, rtol=1e-6)


def test_linear_dispatch_kernel_and_widened_gemm():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 200, generator=g) * 0.05).bfloat16()
    for shape in ((1, 200), (16, 200), (17, 200), (40, 200), (2, 5, 200)):
        x = torch.randn(*shape, generator=g)
        y = linear(x, w)
        assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 96)
        torch.testing.assert_close(y, x @ w.float().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dense", "moe", "tied"])
def test_model_equals_fp32_model_of_the_same_checkpoint(ckpts, name):
    d = ckpts[name]
    ref = load_model(str(d), dtype="fp32")
    m = load_model(str(d), dtype="fp32", quantization="bf16")
    assert m.dtype == torch.float32 and m.quantization == "bf16"
    assert any("bf16 storage" in n for n in m.load_report.notes)
    # every matrix but the conv kernel is stored in bf16; norms and DeltaNet scalars stay fp32
    for pname, p in m.named_parameters():
        big = p.dim() >= 2 and "conv1d" not in pname
        assert p.dtype == (torch.bfloat16 if big else torch.float32), pname
    tied = ref.lm_head.weight is ref.model.embed_tokens.weight
    assert tied == (name == "tied") and (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    half = sum(p.nbytes for p in {p.data_ptr(): p for p in m.parameters()}.values())
    full = sum(p.nbytes for p in {p.data_ptr(): p for p in ref.parameters()}.values())
    assert half < 0.55 * full
    ids = torch.randint(0, m.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref(ids), atol=1e-5, rtol=1e-5)


def _tokens(llm, prompts, n=12):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_engine_tokens_equal_fp32(ckpts, name):
    d = ckpts[name]
    prompts = [[5, 9, 2, 7, 11, 3], list(range(3, 40)), [17, 4]]
    ref = _tokens(LLM(str(d), dtype="fp32", verbose=False), prompts)
    llm = LLM(str(d), dtype="fp32", quantization="bf16", verbose=False)
    assert llm.engine.model.quantization == "bf16"
    screen = llm.engine.runner.head_screen  # the bf16 head's int8 screen, on fp32 rows
    assert screen is None or screen.rows_dtype == torch.float32
    assert _tokens(llm, prompts) == ref  # batched
    assert [_tokens(llm, [p])[0] for p in prompts] == ref  # alone


def test_refused_with_a_bf16_model_or_off_the_cpu(ckpts):
    with pytest.raises(Qwen35Error, match="--dtype fp32"):
        load_model(str(ckpts["dense"]), dtype="bf16", quantization="bf16")
    with pytest.raises(Qwen35Error, match="on a GPU run --dtype bf16"):
        load_model(str(ckpts["dense"]), dtype="fp32", device="meta", quantization="bf16")


def test_dtype_auto_keeps_bf16_weights_where_it_computes_in_fp32(ckpts, tmp_path, monkeypatch):
    """A CPU without native bf16 (flags hidden): --dtype auto computes in fp32 and keeps a BF16
    checkpoint's weights in bf16; a checkpoint stored in fp32 stays fp32; explicit choices win."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(devices, "_bf16_rows_kernel", lambda: False)  # no GEMV kernel: fp32
    assert devices.default_quantization("auto", "cpu", None, "bfloat16") is None
    monkeypatch.setattr(devices, "_bf16_rows_kernel", lambda: True)
    assert devices.default_quantization("auto", "cpu", None, "bfloat16") == "bf16"
    assert devices.default_quantization("auto", "cpu", "int8", "bfloat16") == "int8"
    assert devices.default_quantization("fp32", "cpu", None, "bfloat16") is None
    assert devices.default_quantization("auto", "cpu", None, "float32") is None
    llm = LLM(str(ckpts["dense"]), verbose=False)  # dtype auto
    assert llm.engine.engine_config.load.quantization == "bf16"
    assert llm.engine.model.dtype == torch.float32
    assert llm.engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    f32 = tmp_path / "f32"
    save_checkpoint(f32, dtype=torch.float32)
    cfg = json.loads((f32 / "config.json").read_text())
    cfg["text_config"]["dtype"] = "float32"
    (f32 / "config.json").write_text(json.dumps(cfg))
    plain = LLM(str(f32), verbose=False)
    assert plain.engine.engine_config.load.quantization is None
    assert plain.engine.model.model.embed_tokens.weight.dtype == torch.float32
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.default_quantization("auto", "cpu", None, "bfloat16") is None


def test_moe_experts_in_one_call_equal_one_call_each(ckpts):
    """A MoE layer's picked experts (decode rows): one `linear_bf16_many` call on fp32 rows gives
    the bits of one call per expert, through the module and through the decode plan."""
    from qwen35.models import cpu_decode
    from qwen35.quant.layers import Bf16Experts

    native_or_skip(gemv.GEMV, "the gemv kernel")
    m = load_model(str(ckpts["moe"]), dtype="fp32", quantization="bf16")
    ex = next(mod for mod in m.modules() if isinstance(mod, Bf16Experts))
    H, I = ex.gate_up_proj.shape[2], ex.intermediate_size
    g = torch.Generator().manual_seed(4)
    es = [0, 3, 1]
    for which, k in (("gate_up", H), ("down", I)):
        xs = [torch.randn(r, k, generator=g) for r in (1, 2, 1)]
        one = ex.gate_up if which == "gate_up" else ex.down
        ref = torch.cat([one(x, e) for x, e in zip(xs, es, strict=True)])
        assert ref.dtype == torch.float32
        assert torch.equal(ex.many(which, xs, es), ref)
        assert torch.equal(cpu_decode._experts_many(ex, torch.float32)(which, xs, es), ref)


def test_moe_routing_in_cpp_on_a_bf16_stored_router(ckpts, monkeypatch):
    """fp32 rows on a bf16-stored router: ops/moe.py `few_token_moe` (gemv_cpu.cpp `moe_route`,
    the logits by linear_bf16's fp32-row path, as the module's own `linear` computes them) runs
    the block's routed experts in the module, and `moe_route` the decode plan's (its one-call
    Bf16Moe step, `_held_block`) (it refused a router of another dtype than x's, leaving torch's
    ~20-op routing on every decode step): the torch routing's result within fp32 rounding,
    batched == alone, the plan's step == the module's."""
    import qwen35.layers.moe as layer_moe
    from qwen35.layers.moe import SparseMoE
    from qwen35.models import cpu_decode
    from qwen35.ops import moe as ops_moe
    from qwen35.ops.backend import select_backend

    native_or_skip(gemv.GEMV, "the gemv kernel")
    m = load_model(str(ckpts["moe"]), dtype="fp32", quantization="bf16")
    blocks = [b for b in m.modules() if isinstance(b, SparseMoE)]
    assert blocks and all(b.gate.weight.dtype == torch.bfloat16 for b in blocks)
    taken, real = [], ops_moe.few_token_moe

    def counted(x, *a):
        out = real(x, *a)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(layer_moe, "few_token_moe", counted)
    monkeypatch.setattr(ops_moe, "few_token_moe", counted)  # (the decode plan's)
    be = select_backend("cpu", dtype=torch.float32)
    x = torch.randn(4, m.config.hidden_size, generator=torch.Generator().manual_seed(5))
    cpu_routed = SparseMoE.cpu_routed
    with torch.inference_mode():
        for b in blocks:
            taken.clear()
            assert cpu_decode._held_block(b, torch.float32) is not None
            got, plan = b(x, be), cpu_decode._moe(b, torch.float32)(x, be)
            alone = torch.cat([b(x[t : t + 1], be) for t in range(4)])
            assert taken == [True] * 5  # (the module's calls; the plan calls moe_route itself)
            monkeypatch.setattr(SparseMoE, "cpu_routed", lambda self, x: None)
            ref = b(x, be)  # torch's routing, then the experts' few-token path
            monkeypatch.setattr(SparseMoE, "cpu_routed", cpu_routed)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(plan, got) and torch.equal(alone, got)


def test_vision_tower_weights_stored_bf16(ckpts):
    """The tower's projection weights are bf16 too (widened per call), its outputs the fp32
    tower's on the same BF16 checkpoint."""
    d = ckpts["dense"]
    ref = load_model(str(d), dtype="fp32", vision=True)
    m = load_model(str(d), dtype="fp32", vision=True, quantization="bf16")
    blk = m.model.visual.blocks[0]
    assert blk.attn.qkv.weight.dtype == torch.bfloat16 and blk.attn.qkv.bias.dtype == torch.float32
    grids = [(1, 4, 6), (1, 2, 2)]
    n = sum(t * h * w for t, h, w in grids)
    px = torch.randn(n, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = m.encode_vision(px, grids), ref.encode_vision(px, grids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_roofline_counts_bf16_weights_and_caches(ckpts):
    """The decode bench's bytes per step: the weights as stored (bf16), the caches as the engine
    allocates them: DeltaNet states as fp32's, K/V in bf16 (--kv-cache-dtype auto over weights
    stored below fp32)."""
    from qwen35.benchmarks.roofline import decode_bytes_per_step

    d = ckpts["dense"]
    f32 = decode_bytes_per_step(load_model(str(d), dtype="fp32"), 100)
    b16 = decode_bytes_per_step(load_model(str(d), dtype="fp32", quantization="bf16"), 100)
    assert 2 * b16["kv"] == f32["kv"] and b16["state"] == f32["state"]
    assert 0.5 * f32["weights"] < b16["weights"] < 0.55 * f32["weights"]
