"""models/cpu_decode.py: the CPU decode plan is bitwise the module path, where it applies, and
stays out of the way where it does not."""

from __future__ import annotations

import pytest
import torch

from qwen35.engine.forward_batch import allocate_caches
from qwen35.models import cpu_decode
from qwen35.ops.backend import select_backend
from qwen35.quant import matmul
from test_backend import BS, Seqs, _model


def _backend():
    be = select_backend("cpu")
    if be.cpu_kernels is None or be.cpu_attention is None or be.cpu_small_ops is None:
        pytest.skip("the CPU kernels are not available here (no compiler, or switched off)")
    return be


def _run(model, backend):
    """test_backend's fixed-block sequences, with caches of the model's dtype (the plan's)."""
    return Seqs(model, backend, cache_dtype=model.dtype)


def _script():
    """(steps, whether the plan applies to each): prefills, decode steps in slot order (one
    run and two runs of slots, a fresh one-token sequence), and out of slot order."""
    g = torch.Generator().manual_seed(3)
    tok = lambda n: torch.randint(2, 256, (n,), generator=g).tolist()  # noqa: E731
    return [
        ([(0, tok(21)), (1, tok(5))], False),  # prefill
        ([(0, tok(1))], True),  # batch 1
        ([(0, tok(1)), (1, tok(1))], True),  # slots 0-1: one run
        ([(0, tok(1)), (1, tok(1)), (3, tok(1))], True),  # slot 3 fresh, a second run
        ([(3, tok(1)), (0, tok(1))], False),  # rows out of slot order
        ([(0, tok(1)), (1, tok(1)), (3, tok(1))], True),
        ([(1, tok(1)), (2, tok(7))], False),  # a mixed step
        ([(1, tok(1)), (2, tok(1))], True),
    ]


def _module_step(modules, items, monkeypatch):
    """modules.step(items) through the module path (the decode plan switched off for it)."""
    with monkeypatch.context() as m:
        m.setattr(cpu_decode.DecodePlan, "applies", staticmethod(lambda b: False))
        return modules.step(items)


def _spy_runs(monkeypatch) -> list:
    runs = []
    real = cpu_decode.DecodePlan.run

    def spy(self, *args):
        runs.append(1)
        return real(self, *args)

    monkeypatch.setattr(cpu_decode.DecodePlan, "run", spy)
    return runs


@pytest.mark.parametrize(
    "dtype,quant,moe",
    [(torch.float32, None, False), (torch.bfloat16, None, False), (torch.bfloat16, "int8", False),
     (torch.bfloat16, "int4", False), (torch.bfloat16, "fp8", False), (torch.float32, None, True),
     (torch.bfloat16, None, True), (torch.bfloat16, "int8", True), (torch.bfloat16, "int4", True),
     (torch.bfloat16, "fp8", True), (torch.float32, "int4", True)],
)  # fmt: skip
def test_plan_equals_module_path_bitwise(dtype, quant, moe, monkeypatch):
    """Also: a MoE block's steps (1-3 rows here, <= ops/moe.py FEW_TOKENS) run in the plan
    (`_moe`, no module call) where its experts' kernels resolve (bf16 / int8 / int4 / FP8
    experts in a bf16 model, int4 in fp32), the module otherwise (fp32 plain experts)."""
    from qwen35.layers.moe import SparseMoE

    be = _backend()
    # FP8 experts take one call per projection where gate and up blocks tile [2I, H] evenly
    model = _model(moe, dtype=dtype, quant=quant,
                   **({"moe_intermediate_size": 128} if moe and quant == "fp8" else {}))  # fmt: skip
    plan, modules = _run(model, be), _run(model, be)
    runs = _spy_runs(monkeypatch)
    module_calls, real_forward = [], SparseMoE.forward
    monkeypatch.setattr(SparseMoE, "forward",
                        lambda self, x, *a: module_calls.append(len(x)) or real_forward(self, x, *a))  # fmt: skip
    # (FP8 experts' one-call kernel needs AVX512: CPUs without it run the block's module)
    probe = torch.zeros(1, 1, dtype=dtype)
    fp8_many = matmul.fp8_kernel_for(probe, (128, 128)) is not None
    # (bf16 rows on int4 experts: our kernel on AVX512-VBMI + BF16, else torch's int4 matmul
    # where its layout is another: the block's module then, e.g. under QWEN35_CPU_ISA=avx2)
    int4_many = matmul.int4_kernel_for(probe, probe) is not None
    resolved = (moe and (dtype == torch.bfloat16 or quant == "int4") and (quant != "fp8" or fp8_many)
                and (quant != "int4" or int4_many))  # fmt: skip
    for items, expected in _script():
        runs.clear()
        module_calls.clear()
        a = plan.step(items)
        assert len(runs) == expected
        if moe and expected:  # the plan ran: its MoE step where the kernels resolve
            assert (module_calls == []) == resolved, module_calls
        b = _module_step(modules, items, monkeypatch)
        assert torch.equal(a, b)
    for name in ("key", "value", "conv", "recurrent"):
        for x, y in zip(getattr(plan.caches, name), getattr(modules.caches, name), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("wider", [1, 2])
@pytest.mark.parametrize(
    "quant,dtype",  # (bf16-stored experts under fp32 rows only: bf16 rows take moe_bf16's call)
    [(q, dt) for q in ("int4", "int8", "fp8") for dt in (torch.float32, torch.bfloat16)]
    + [("bf16", torch.float32)],
)
def test_held_moe_block_in_one_call_equals_module_path(quant, dtype, wider, monkeypatch,
                                                        tmp_path):  # fmt: skip
    """An int4 / int8 / FP8 / bf16-stored (fp32 rows) MoE block's decode step through
    `Int4Moe` / `Int8Moe` / `Fp8Moe` / `Bf16Moe` (`_held_block`: the routed and shared experts'
    products and SwiGLUs in one call between moe_route and moe_combine) equals the module path
    bit for bit, with the shared expert as
    wide as the experts (int4: one parallel_for a pass) and twice as wide (two); up to 16 rows
    (6 here: past MANY_MAX_ROWS), also with one expert taking more rows than linear_int8_many
    does (6 fresh sequences of one token: every row routed alike). (FP8 with bf16 rows on AVX512
    CPUs keeps `_moe`'s per-call path on gemv_cpu.cpp's kernel.)"""
    from qwen35.layers.moe import SparseMoE

    be = _backend()
    probe = torch.zeros(1, 1, dtype=dtype)
    if quant == "int4" and matmul.int4_kernel_for(probe, probe, True) is None:
        pytest.skip(f"our int4 kernel does not take {dtype} rows on this CPU (torch's does)")
    if quant == "fp8" and matmul.fp8_kernel_for(probe, (128, 128)) is not None:
        pytest.skip(f"{dtype} rows take gemv_cpu.cpp's FP8 kernel on this CPU (AVX512)")
    inter = 128 if quant == "fp8" else 64  # (FP8: gate and up one product, I % 128 == 0)
    sizes = dict(moe_intermediate_size=inter, shared_expert_intermediate_size=inter * wider)
    if quant == "bf16":  # bf16 storage under fp32 rows (the loader's)
        from qwen35.loader import load_model
        from tiny import save_checkpoint

        save_checkpoint(tmp_path, dtype=torch.bfloat16, moe=True, **sizes)
        model = load_model(str(tmp_path), dtype="fp32", quantization="bf16")
    else:
        model = _model(True, dtype=dtype, quant=quant, **sizes)
    runs, real = [], cpu_decode._held_block

    def spy(mlp, dt):
        run = real(mlp, dt)
        assert run is not None  # every block of this model resolves
        return lambda x, b: runs.append(len(x)) or run(x, b)

    monkeypatch.setattr(cpu_decode, "_held_block", spy)
    module_calls, real_forward = [], SparseMoE.forward
    monkeypatch.setattr(SparseMoE, "forward",
                        lambda self, x, *a: module_calls.append(len(x)) or real_forward(self, x, *a))  # fmt: skip
    moe_layers = sum(layer.is_moe for layer in model.model.layers)
    g = torch.Generator().manual_seed(5)
    six = [(s, torch.randint(2, 256, (1,), generator=g).tolist()) for s in range(6)]
    alike = [(s, [42]) for s in range(6)]
    for script in ([*_script(), (six, True), (six, True)], [(alike, True)]):  # (slots 4, 5 fresh)
        plan, modules = _run(model, be), _run(model, be)
        for run in (plan, modules):  # room for 6 sequences (Seqs: 20 blocks each)
            run.caches = allocate_caches(model.config, 120, BS, 8, dtype, "cpu")
        for items, expected in script:
            runs.clear()
            module_calls.clear()
            a = plan.step(items)
            if expected:
                assert runs == [len(items)] * moe_layers and module_calls == []
            b = _module_step(modules, items, monkeypatch)
            assert torch.equal(a, b)


def test_bf16_moe_block_call_takes_up_to_16_rows(monkeypatch):
    """A bf16 MoE block's plan step is moe_bf16's one call (`SparseMoE.cpu_step`) for up to
    FEW_TOKENS rows, as the module calls it (6 rows here, past MANY_MAX_ROWS): no module call,
    the module path's logits bit for bit."""
    from qwen35.layers.moe import SparseMoE

    be = _backend()
    model = _model(True, dtype=torch.bfloat16)
    module_calls, real_forward = [], SparseMoE.forward
    monkeypatch.setattr(SparseMoE, "forward",
                        lambda self, x, *a: module_calls.append(len(x)) or real_forward(self, x, *a))  # fmt: skip
    plan, modules = _run(model, be), _run(model, be)
    for run in (plan, modules):  # room for 6 sequences (Seqs: 20 blocks each)
        run.caches = allocate_caches(model.config, 120, BS, 8, torch.bfloat16, "cpu")
    g = torch.Generator().manual_seed(6)
    for _ in range(2):
        items = [(s, torch.randint(2, 256, (1,), generator=g).tolist()) for s in range(6)]
        module_calls.clear()
        a = plan.step(items)
        assert module_calls == []
        b = _module_step(modules, items, monkeypatch)
        assert torch.equal(a, b)


def test_held_moe_block_refused_by_its_object_falls_back(monkeypatch):
    """An object whose own checks refuse the block's tensors (a layout the Python checks let
    through) leaves the block to `_moe`'s other paths: the plan is built and its steps equal
    the module path's, instead of a failed step."""
    from qwen35.kernels import gemv

    be = _backend()
    probe = torch.zeros(1, 1, dtype=torch.float32)
    g4 = gemv.load_int4()
    if g4 is None or matmul.int4_kernel_for(probe, probe, True) is None:
        pytest.skip("the int4 kernel is not available here (no compiler or no AVX2)")

    def refuse(*a, **k):
        raise RuntimeError("Int4Moe: refused")

    monkeypatch.setattr(g4, "Int4Moe", refuse)
    model = _model(True, dtype=torch.float32, quant="int4", moe_intermediate_size=64,
                   shared_expert_intermediate_size=64)  # fmt: skip
    mlp = next(layer.mlp for layer in model.model.layers if layer.is_moe)
    assert cpu_decode._held_block(mlp, torch.float32) is None
    plan, modules = _run(model, be), _run(model, be)
    for items, _ in _script():
        a = plan.step(items)
        b = _module_step(modules, items, monkeypatch)
        assert torch.equal(a, b)


@pytest.mark.parametrize("quant", ["int4", "int8", "fp8"])
def test_held_moe_blocks_refuse_bad_inputs(quant):
    """Int4Moe / Int8Moe / Fp8Moe.run check what they are given: counts that do not add up to
    the rows, an expert id out of range, an empty run, rows of another dtype than the scales
    (int4 / int8) or than each other."""
    from qwen35.kernels import fp8, gemv
    from qwen35.quant.matmul import quantize_fp8, quantize_int4, quantize_int8

    mod = {"int4": gemv.load_int4, "int8": gemv.load, "fp8": fp8.load}[quant]()
    if mod is None:
        pytest.skip("the CPU kernels are not available here (no compiler or no AVX2)")
    gen = torch.Generator().manual_seed(0)
    if quant == "int4":
        w = lambda n, k: quantize_int4(torch.randn(n, k, generator=gen), 32, torch.float32)  # noqa: E731
        (gu, gu_s), (dn, dn_s) = w(128, 64), w(64, 64)
        block = mod.Int4Moe([gu, gu], [gu_s, gu_s], [dn, dn], [dn_s, dn_s], gu, gu_s, dn, dn_s,
                            32, 32, 32, True)  # fmt: skip
    elif quant == "int8":
        w = lambda n, k: quantize_int8(torch.randn(n, k, generator=gen), torch.float32)  # noqa: E731
        (gu, gu_s), (dn, dn_s) = w(128, 64), w(64, 64)
        block = mod.Int8Moe([gu, gu], [gu_s, gu_s], [dn, dn], [dn_s, dn_s], gu, gu_s, dn, dn_s)
    else:
        w = lambda n, k: quantize_fp8(torch.randn(n, k, generator=gen), (32, 32), torch.float32)  # noqa: E731
        (gu, gu_s), (dn, dn_s) = w(128, 64), w(64, 64)
        block = mod.Fp8Moe([gu, gu], [gu_s, gu_s], [dn, dn], [dn_s, dn_s], gu, gu_s, dn, dn_s,
                           32, 32)  # fmt: skip
    x = torch.randn(2, 64)
    ys, shared = block.run(x[[0, 1, 1]], [0, 1], [2, 1], x)
    assert ys.shape == (3, 64) and shared.shape == (2, 64)
    for args, msg in [(([0, 1], [2, 2]), "add up"), (([0, 1], [1, 1]), "add up"),
                      (([0, 2], [2, 1]), "outside"), (([0, 1], [3, 0]), "empty run")]:  # fmt: skip
        with pytest.raises(RuntimeError, match=msg):
            block.run(x[[0, 1, 1]], *args, x)
    with pytest.raises(RuntimeError, match="dtype"):
        block.run(x[[0, 1, 1]].bfloat16(), [0, 1], [2, 1], x if quant == "fp8" else x.bfloat16())


@pytest.mark.parametrize("quant", ["int8", "int4", "fp8"])
def test_plan_calls_quantized_kernels_directly(quant, monkeypatch):
    """The plan calls the int8 / int4 / FP8 kernels without the modules around them (the bitwise test
    above would pass through the modules too): a decode step through the plan makes no
    quant.matmul call, nor a layers/linear.py `linear` kernel lookup for the bf16 members packed
    beside them (DeltaNet's in_proj_b/a), and its logits equal the module path's."""
    from qwen35.quant import matmul

    be = _backend()
    dtype = torch.bfloat16
    bf16 = torch.zeros(1, 1, dtype=dtype)
    if quant == "int4" and matmul.int4_kernel_for(bf16, bf16) is None:
        dtype = torch.float32  # our int4 kernel takes bf16 rows on AVX512-VBMI + BF16 only
    model = _model(False, dtype=dtype, quant=quant)
    plan, modules = _run(model, be), _run(model, be)
    calls, plain = [], []
    name = f"{quant}_linear"
    real = getattr(matmul, name)
    monkeypatch.setattr(matmul, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    import qwen35.layers.linear as linear_mod

    real_lookup = linear_mod.gemv_kernel_for  # `linear`'s per-call lookup (DeltaNet's bf16
    # in_proj_b/a run: the plan resolves its kernel once)
    monkeypatch.setattr(linear_mod, "gemv_kernel_for",
                        lambda *a: plain.append(1) or real_lookup(*a))  # fmt: skip
    prefill = [(0, list(range(5, 26)))]
    plan.step(prefill)
    modules.step(prefill)
    calls.clear()
    plain.clear()
    a = plan.step([(0, [7])])
    in_plan = len(calls)
    assert in_plan <= 1  # the int8 lm_head (computed after the layers) goes through quant.matmul
    assert len(plain) == (quant == "fp8")  # (FP8 keeps lm_head bf16: its module, after the layers)
    b = _module_step(modules, [(0, [7])], monkeypatch)
    assert len(calls) - in_plan > 4 and torch.equal(a, b)  # the layers' matmuls, module path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_calls_plain_gemv_kernels_directly(dtype, monkeypatch):
    """Plain fp32 / bf16 weights: the plan calls the GEMV kernel it resolved once, without
    layers/linear.py `linear` (whose per-call kernel lookup it skips), for decode rows up to
    gemv_max_rows (the tiny model's rows are short: bf16 up to 16 where the tiles run), and
    `linear` (torch's GEMM) for more rows; bitwise the module path both ways."""
    from qwen35.layers.linear import gemv_max_rows

    be = _backend()
    model = _model(False, dtype=dtype)
    w = model.model.layers[0].mlp.down_proj.weight
    limit = gemv_max_rows(torch.zeros(1, 1, dtype=dtype), w)
    n = limit + 1  # sequences: one decode step past the kernel's rows
    plan, modules = _run(model, be), _run(model, be)
    for run in (plan, modules):  # room for n sequences (Seqs: 20 blocks each)
        run.caches = allocate_caches(model.config, 20 * n, BS, n, dtype, "cpu")
    calls = []
    real = cpu_decode.linear
    monkeypatch.setattr(cpu_decode, "linear", lambda *a: calls.append(len(a[0])) or real(*a))
    g = torch.Generator().manual_seed(7)
    tok = lambda k: torch.randint(2, 256, (k,), generator=g).tolist()  # noqa: E731
    for items in ([(s, tok(6)) for s in range(n)], [(0, tok(1))], [(1, tok(1)), (2, tok(1))],
                  [(s, tok(1)) for s in range(n)]):  # fmt: skip
        calls.clear()
        a = plan.step(items)
        if all(len(t) == 1 for _, t in items):  # the plan: no `linear` call at kernel rows
            assert (calls == []) == (len(items) <= limit), calls
        b = _module_step(modules, items, monkeypatch)
        assert torch.equal(a, b)


def test_where_the_plan_does_not_apply(monkeypatch):
    """fp16 models, other cache dtypes, QWEN35_NO_KERNELS=1 (at any time): the module path."""
    be = _backend()
    runs = _spy_runs(monkeypatch)
    half = _model(dtype=torch.float16)
    assert not cpu_decode.supported(half, allocate_caches(half.config, 4, BS, 2, half.dtype, "cpu"))
    run = _run(half, be)
    run.step([(0, [5, 6, 7])])
    run.step([(0, [8])])
    assert runs == []
    dense = _model(dtype=torch.bfloat16)
    assert not cpu_decode.supported(dense, allocate_caches(dense.config, 4, BS, 2, torch.float32,
                                                           "cpu"))  # fmt: skip
    run = _run(dense, be)
    run.step([(0, [5, 6, 7])])
    run.step([(0, [8])])
    assert runs == [1]
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    run.step([(0, [9])])
    assert runs == [1]


def test_post_load_drops_the_plan():
    """The plan holds the weights: moving the model (post_load packs again) rebuilds it."""
    be = _backend()
    model = _model()
    run = _run(model, be)
    run.step([(0, [5, 6, 7])])
    run.step([(0, [8])])
    first = model._decode_plan
    assert first is not None
    model.post_load()
    assert model._decode_plan is None
    run.step([(0, [9])])
    assert model._decode_plan is not None and model._decode_plan is not first


def test_engine_steps_decode_rows_in_slot_order(tmp_path, monkeypatch):
    """A sequence that joins after another finished takes its free (lower) state slot, so the
    scheduler's order is not the slots' order: the CPU runner sorts a decode step's rows by
    slot, and every decode step runs the plan; outputs equal each request alone."""
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.request import SamplingParams
    from tiny import save_checkpoint

    _backend()
    save_checkpoint(tmp_path / "m", moe=False)
    eng = LLMEngine(str(tmp_path / "m"), dtype="fp32", max_num_seqs=3, verbose=False)
    seen = []
    applies = cpu_decode.DecodePlan.applies

    def spy(batch):
        ok = applies(batch)
        if not batch.prefill:
            seen.append((batch.decode.all_rows_in_slot_order, ok))
        return ok

    monkeypatch.setattr(cpu_decode.DecodePlan, "applies", staticmethod(spy))
    orders = []  # the scheduler's slot order of each decode-only step, before the runner's sort
    execute = eng.runner.execute

    def execute_spy(scheduled):
        if scheduled and all(s.num_new_tokens == 1 for s in scheduled):
            orders.append([s.seq.state_slot for s in scheduled])
        return execute(scheduled)

    monkeypatch.setattr(eng.runner, "execute", execute_spy)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (9, 4, 13, 6)]
    lengths = [2, 9, 9, 6]  # the first finishes early; the fourth then takes its slot 0

    def run(ids):
        for i in ids:
            sp = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
            eng.add_request(str(i), prompts[i], sp)
        out = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out[int(o.request_id)] = o.outputs[0].token_ids
        return out

    together = run(range(4))
    assert any(o != sorted(o) for o in orders)  # the case this test is about happened
    assert len(seen) == len(orders) and all(ok for ok, _ in seen) and all(ok for _, ok in seen)
    for i in range(4):
        alone = run([i])
        assert alone[i] == together[i]
