"""Weight-only int8 / int4 and the FP8 CPU kernel: kernels against their PyTorch references,
models close to BF16 (documented tolerance), batched == alone, memory == the planner's formula."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kernel_modules import rows_alone_mismatches
from qwen35.kernels import fp8 as fp8_kernel
from qwen35.loader import load_model
from qwen35.plan.params import weight_bytes
from qwen35.quant import formats, matmul
from qwen35.quant.layers import Int4Linear, Int8Linear
from tiny import save_checkpoint

# sizes where int4 applies (out % 64 == 0) beside ones where it falls back to int8
DENSE = dict(moe=False, intermediate_size=128)
MOE = dict(moe=True, moe_intermediate_size=64)
# documented in the README: cosine similarity of logits rows with the BF16 model, mean and worst
# row (a MoE row whose top-k routing flips on a near tie is the worst)
COSINE = {"int8": (0.999, 0.99), "int4": (0.98, 0.9)}


@pytest.mark.parametrize("M", [1, 3, 16, 17])
@pytest.mark.parametrize("N,K", [(200, 333), (64, 64), (384, 1024)])
def test_fp8_linear_matches_reference(M, N, K):
    g = torch.Generator().manual_seed(N + K)
    q, s = formats.quantize_fp8_blocks(torch.randn(N, K, generator=g) * 0.05)
    x = torch.randn(M, K, generator=g)
    ref = x @ formats.dequantize_fp8_blocks(q, s, torch.float32).T
    y = matmul.fp8_linear(x, q, s.float(), (128, 128))
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    yb = matmul.fp8_linear(x.bfloat16(), q, s.float(), (128, 128))
    torch.testing.assert_close(yb.float(), ref, atol=3e-2, rtol=2e-2)


def test_fp8_kernel_decodes_every_byte_exactly():
    mod = fp8_kernel.load()
    if mod is None:
        pytest.skip("no compiler / AVX2+F16C here: the PyTorch path runs instead")
    b = torch.arange(256, dtype=torch.uint8)
    b = b[(b & 0x7F) != 0x7F]  # e4m3fn's NaN bytes
    q = b.view(torch.float8_e4m3fn)[None].contiguous()
    out = torch.empty(1, q.shape[1])
    mod.fp8_dequant(q, torch.ones(1, 2), out, 128, 128)
    assert torch.equal(out[0], q[0].float())


@pytest.fixture(params=[False, True], ids=["denormals", "flush-denormals"])
def flush_denormal(request):
    """Both MXCSR states: the engine flushes denormals (engine/runtime.py), and fp8_cpu.cpp's
    decode reads e4m3 subnormals as fp32 denormals, so it must clear DAZ for itself."""
    torch.set_flush_denormal(request.param)
    yield request.param
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_avx2_kernel_rows_and_tails(dtype, flush_denormal):
    """fp8_cpu.cpp's fp8_linear (the CPUs without AVX512's path) called directly: 1-16 rows in
    groups of up to 4, blocks with a partial last chunk (K % 16 != 0), every byte exact (the
    subnormal ones too, with denormals flushed or not)."""
    mod = fp8_kernel.load()
    if mod is None:
        pytest.skip("no compiler / AVX2+F16C here: the PyTorch path runs instead")
    g = torch.Generator().manual_seed(7)
    for n, k in [(70, 333), (3, 40), (129, 256)]:
        q, s = formats.quantize_fp8_blocks(torch.randn(n, k, generator=g))
        s = s.float()
        w = formats.dequantize_fp8_blocks(q, s, torch.float32)
        for m in (1, 2, 3, 5, 16):
            x = torch.randn(m, k, generator=g).to(dtype)
            y = mod.fp8_linear(x, q, s, 128, 128)
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
            torch.testing.assert_close(y.float(), x.float() @ w.T, **tol)
    b = torch.arange(256, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0  # e4m3fn's NaN bytes
    q = b.view(torch.float8_e4m3fn).repeat(2, 1)
    eye = torch.eye(256).to(dtype)
    for start in range(0, 256, 16):  # each input row picks one weight column
        y = mod.fp8_linear(eye[start : start + 16], q, torch.ones(1, 2), 128, 128)
        assert torch.equal(y[:, 0].float(), q[0, start : start + 16].float())
    # each row's result is bitwise its result alone, whatever rows share the call, in both builds
    # (AVX512 CPUs run 3-4 rows in one pass with VL's registers, AVX2 ones as 2 + the rest), and
    # the two builds give the same bits
    q, s = formats.quantize_fp8_blocks(torch.randn(4096, 1000, generator=g) * 0.05)
    x = torch.randn(16, 1000, generator=g).to(dtype)
    for avx2_only in (False, True):
        got = rows_alone_mismatches(
            lambda r, a2=avx2_only: mod.fp8_linear(r, q, s.float(), 128, 128, avx2_only=a2), x
        )
        assert all(v == 0 for v in got.values()), (avx2_only, got)
    assert torch.equal(mod.fp8_linear(x, q, s.float(), 128, 128),
                       mod.fp8_linear(x, q, s.float(), 128, 128, avx2_only=True))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_avx2_many_products_equal_one_call_each(dtype, flush_denormal):
    """fp8_cpu.cpp's fp8_linear_many (a MoE layer's picked experts in one parallel_for) gives
    every row the bits fp8_linear gives it alone, in both builds, 1-4 rows a product, odd K;
    quant/matmul.py fp8_linear_many takes it where gemv_cpu.cpp's AVX512 paths do not run."""
    mod = fp8_kernel.load()
    if mod is None:
        pytest.skip("no compiler / AVX2+F16C here: the PyTorch path runs instead")
    g = torch.Generator().manual_seed(11)
    n, k = 70, 333
    pairs = [formats.quantize_fp8_blocks(torch.randn(n, k, generator=g)) for _ in range(5)]
    ws, ss = [p[0] for p in pairs], [p[1].float() for p in pairs]
    xs = [torch.randn(m, k, generator=g).to(dtype) for m in (1, 3, 2, 4, 1)]
    for avx2_only in (False, True):
        got = mod.fp8_linear_many(xs, ws, ss, 128, 128, avx2_only)
        one = torch.cat([mod.fp8_linear(x, w, s, 128, 128, avx2_only)
                         for x, w, s in zip(xs, ws, ss, strict=True)])  # fmt: skip
        assert got.dtype == dtype and torch.equal(got, one), avx2_only
    want = torch.cat([matmul.fp8_linear(x, w, s, (128, 128)) for x, w, s in zip(xs, ws, ss, strict=True)])
    got = matmul.fp8_linear_many(xs[:4], ws[:4], ss[:4], (128, 128))
    assert got is not None and torch.equal(got, want[: sum(len(x) for x in xs[:4])])
    with pytest.raises(RuntimeError, match="one shape"):
        mod.fp8_linear_many(xs[:2], [ws[0], ws[1][:10].contiguous()], [ss[0], ss[1][:1]], 128, 128)


def test_int4_pack_and_unpack_and_torchs_layout():
    """Our packing inverts our unpack; it is torch's where torch runs its AVX512 code, and
    torch_int4_layout says whether it is on this CPU (with AVX2 torch packs 32-row blocks)."""
    q = torch.randint(0, 16, (128, 96), dtype=torch.int32)
    packed = matmul.pack_int4(q)
    assert packed.shape == (128, 48) and packed.dtype == torch.uint8
    assert torch.equal(matmul.unpack_int4(packed, 128, 96), q)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(theirs, packed) == matmul.torch_int4_layout()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 4, 40])
def test_int_linear_matches_reference(fmt, M):
    g = torch.Generator().manual_seed(M)
    w = (torch.randn(128, 256, generator=g) * 0.05).bfloat16()
    lin = (
        Int8Linear.quantize(w, torch.bfloat16)
        if fmt == "int8"
        else Int4Linear.quantize(w, 128, torch.bfloat16)
    )
    x = torch.randn(M, 256, generator=g).bfloat16()
    ref = x.float() @ lin.dequantized(torch.float32).T
    torch.testing.assert_close(lin(x).float(), ref, atol=5e-2, rtol=2e-2)


@pytest.fixture(scope="module", params=["dense", "moe"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    save_checkpoint(d, dtype=torch.bfloat16, **(DENSE if request.param == "dense" else MOE))
    return d


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_model_close_to_bf16_and_planner_bytes(ckpt, fmt):
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = load_model(ckpt, dtype="bf16")(ids).flatten(0, 1)
    m = load_model(ckpt, dtype="bf16", quantization=fmt)
    assert any(isinstance(x, Int4Linear if fmt == "int4" else Int8Linear) for x in m.modules())
    out = m(ids).flatten(0, 1)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.mean().item() > COSINE[fmt][0] and cos.min().item() > COSINE[fmt][1]
    got = sum(p.numel() * p.element_size() for p in m.parameters())
    want = weight_bytes(m.config, fmt, text_only=True)
    assert abs(got - want) / want < 0.01


def test_int4_activations_option(ckpt):
    """`int4_activations` (`--int4-activations`): int8 (the default) rounds int4 decode rows'
    activations to 8 bits per 32 inputs, 16bit keeps them; the engine sets Int4Linear.x8 for the
    process and drops the model's decode plans (they read it when built); bad values are refused
    with the option's name."""
    from qwen35 import LLM, SamplingParams
    from qwen35.errors import Qwen35Error

    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    try:
        llm = LLM(str(ckpt), dtype="bf16", quantization="int4", verbose=False,
                  max_memory="256MiB", int4_activations="16bit")  # fmt: skip
        assert Int4Linear.x8 is False
        model = llm.engine.model
        assert len(llm.generate([[5, 17, 42]], sp)[0].outputs[0].token_ids) == 6
        lin = next(m for m in model.modules() if type(m) is Int4Linear)
        x = torch.randn(1, lin.in_features, generator=torch.Generator().manual_seed(3)).bfloat16()
        y16 = lin(x)
        LLM(model, verbose=False, max_memory="256MiB")  # the default: int8
        assert Int4Linear.x8 is True and model._decode_plan is None
        y8 = lin(x)
        ref = x.float() @ lin.dequantized(torch.float32).T
        if matmul.int4_kernel_for(x, lin.scales_and_zeros, True) is not None:
            assert not torch.equal(y8, y16)  # the 8-bit rounding of x shows
        for y in (y8, y16):
            torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)
        with pytest.raises(Qwen35Error, match="int4_activations must be one of int8, 16bit"):
            LLM(model, verbose=False, int4_activations="int4")
    finally:
        Int4Linear.x8 = True


@pytest.mark.parametrize("fmt", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_int_batched_equals_alone(ckpt, fmt):
    from qwen35 import LLM, SamplingParams

    llm = LLM(
        str(ckpt),
        dtype="fp32",  # bf16 rounding differs between GEMM shapes; fp32 pins the tokens
        quantization=fmt,
        max_num_seqs=4,
        verbose=False,
        max_memory="256MiB",
    )
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 42, 7, 99, 3], [200, 1, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    alone = [llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


@pytest.mark.slow
def test_plan_cpu_rows_equal_engine_bytes(ckpt, tmp_path):
    """`qwen35 plan --dtype int8|int4 --json` gives the bytes the quantizing loader holds."""
    import json
    import subprocess
    import sys

    for fmt in ("int8", "int4"):
        out = subprocess.run(
            [sys.executable, "-m", "qwen35.cli", "plan", "-m", str(ckpt), "--dtype", fmt,
             "--json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        planned = json.loads(out.stdout)["models"][0]["weights_bytes"][fmt]
        m = load_model(ckpt, dtype="bf16", quantization=fmt)
        got = sum(p.numel() * p.element_size() for p in m.parameters())
        assert abs(got - planned) / planned < 0.01


@pytest.mark.parametrize("fmt", ["int4", "bf16"])
def test_plan_cpu_memory_is_what_the_engine_allocates(ckpt, capsys, fmt):
    """`qwen35 plan --dtype int4 --cpu-memory GIB --context C --batch B` (or without --dtype:
    BF16, the weights as stored with the head screen a CPU engine keeps): the caches an engine
    given that memory (`--max-memory`) allocates: KV bytes per token and state bytes per
    sequence, B sequences of C tokens fit exactly when the engine's cache holds B x C tokens,
    the longest context B sequences get, the sequences of C tokens 32 slots hold; the serve line
    it prints builds that engine."""
    import json
    import shlex

    from qwen35.cli import main
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.errors import Qwen35Error

    ctx, batch = 1024, 3
    for mem in (0.005, 0.003):  # ~5 MiB: fits (with room to spare); ~3 MiB: does not
        fmt_args = ["--dtype", "int4"] if fmt == "int4" else []
        assert main(["plan", "-m", str(ckpt), *fmt_args, "--cpu-memory", str(mem),
                     "--context", str(ctx), "--batch", str(batch), "--chunk", "256",
                     "--json"]) == 0  # fmt: skip
        m = json.loads(capsys.readouterr().out)["models"][0]["memory"]
        kw = dict(dtype="bf16", quantization=fmt if fmt == "int4" else None, text_only=True,
                  max_memory=f"{mem}GiB", max_num_batched_tokens=256)  # fmt: skip (as its line)
        try:
            whole = LLMEngine(str(ckpt), max_num_seqs=batch, **kw).plan  # all memory allows
        except Qwen35Error as e:  # not even one sequence: the plan says so, in the same words
            assert not m["fits"] and m["max_context"] == 0 and m["reason"] == str(e)
            continue
        assert m["kv_bytes_per_token"] == whole.kv_bytes_per_token
        assert m["state_bytes_per_sequence"] == whole.state_bytes_per_sequence
        assert m["prefix_checkpoints"] == whole.num_checkpoint_slots
        assert m["max_context"] == (min(whole.max_model_len, whole.kv_tokens // batch)
                                    if whole.num_state_slots >= batch else 0)  # fmt: skip
        assert m["fits"] == (whole.kv_tokens >= batch * ctx)
        if m["fits"]:
            assert ctx < m["max_context"] < 4096  # neither the ask nor the model's length
            at = LLMEngine(str(ckpt), max_num_seqs=32, max_model_len=ctx, **kw).plan
            assert m["max_concurrency"] == min(at.num_state_slots, at.kv_tokens // ctx) >= 1
            argv = shlex.split(m["serve"])
            assert argv[:4] == ["qwen35", "serve", "--model", str(ckpt)] and "--text-only" in argv
            assert argv[argv.index("--max-memory") + 1] == f"{mem:g}GiB"
            assert argv[argv.index("--max-num-seqs") + 1] == str(batch)
            assert argv[argv.index("--max-num-batched-tokens") + 1] == "256"
        else:
            assert "need 3,072 KV tokens" in m["reason"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_in_chunks_equal_one_pass(dtype):
    """quantize_int8_rows works through rows in chunks (small fp32 temporaries): the result
    equals one pass over the whole matrix, and an fp32 input is left as it was."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(37, 50, generator=g) * torch.rand(37, 1, generator=g)).to(dtype)
    before = w.clone()
    q1, s1 = formats.quantize_int8_rows(w, torch.bfloat16, chunk=1 << 30)  # one chunk
    for chunk in (1, 50, 149, 500):  # one row, whole rows, a partial last chunk
        q, s = formats.quantize_int8_rows(w, torch.bfloat16, chunk=chunk)
        assert torch.equal(q, q1) and torch.equal(s, s1)
    assert torch.equal(w, before)
    w32 = w.float()  # the reference: the formula over the whole matrix at once
    ref_s = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    ref_q = torch.round(w32 / ref_s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q1, ref_q) and torch.equal(s1, ref_s)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_fp32_rows_past_the_kernel_run_it_in_chunks(fmt, monkeypatch):
    """fp32 rows past the CPU kernels' 16, up to CHUNKED_MAX_ROWS (the rows of a MoE prefill's
    experts, decode batches), take the kernel 16 rows a call: the bits of those calls; past the
    cap, the dequantised / widened weight and torch's GEMM, close to the same products. (fp32
    weights: the GEMM past 16 rows, test_gemv.py.)"""
    from qwen35.kernels import gemv
    from qwen35.layers import linear as lin

    if gemv.load() is None:
        pytest.skip("the CPU kernels did not build here (no compiler, or QWEN35_NO_KERNELS)")
    g = torch.Generator().manual_seed(9)
    w = torch.randn(96, 256, generator=g) * 0.05
    mod = gemv.load()
    if fmt == "int8":
        q, s = formats.quantize_int8_rows(w, torch.float32)
        fn, dt, ref_w = (lambda x: matmul.int8_linear(x, q, s)), torch.int8, q.float() * s[:, None]
        kernel = lambda x: mod.linear_int8(x, q, s)  # noqa: E731
    else:
        wb = w.bfloat16()
        fn, dt, ref_w = (lambda x: lin.linear(x, wb)), torch.bfloat16, wb.float()
        kernel = lambda x: mod.linear_bf16(x, wb)  # noqa: E731
    cap = lin.CHUNKED_MAX_ROWS[dt]
    assert cap > 16
    x = torch.randn(cap + 8, 256, generator=g)
    for m in (17, cap):  # chunks of 16 and a partial last one
        want = torch.cat([kernel(x[i : min(i + 16, m)]) for i in range(0, m, 16)])
        assert torch.equal(fn(x[:m]), want)
    alone = fn(x[:cap])
    calls = []
    real = lin.in_chunks
    counted = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    monkeypatch.setattr(lin, "in_chunks", counted)
    monkeypatch.setattr(matmul, "in_chunks", counted)
    above = fn(x)  # past the cap: one GEMM
    assert not calls
    fn(x[:cap])
    assert calls
    torch.testing.assert_close(above[:cap], alone, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(above, x @ ref_w.T, atol=2e-3, rtol=2e-3)


def test_int8_dequantised_gemm_equals_reference_products():
    """Past the kernels, int8_linear dequantises into the scratch buffer (copy + in-place scale:
    the products torch.mul(q, scale) gives, without its slow mixed-dtype loop) before the GEMM."""
    g = torch.Generator().manual_seed(10)
    w = torch.randn(64, 160, generator=g) * 0.05
    for dtype in (torch.float32, torch.bfloat16):
        q, s = formats.quantize_int8_rows(w, dtype)
        x = torch.randn(70, 160, generator=g).to(dtype)
        want = torch.nn.functional.linear(x, torch.mul(q, s[:, None]).to(dtype))
        assert torch.equal(matmul.int8_linear(x, q, s), want)


def test_int4_groups_in_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(40, 256, generator=g) * torch.rand(40, 1, generator=g)).bfloat16()
    q1, sz1 = formats.quantize_int4_groups(w, 64, torch.bfloat16, chunk=1 << 30)
    for chunk in (1, 256, 700):  # one row, whole rows, a partial last chunk
        q, sz = formats.quantize_int4_groups(w, 64, torch.bfloat16, chunk=chunk)
        assert torch.equal(q, q1) and torch.equal(sz, sz1)
    assert q1.dtype == torch.int32 and sz1.shape == (4, 40, 2) and sz1.is_contiguous()
    gw = w.float().view(40, 4, 64)  # the reference: the formula over the whole matrix at once
    lo, hi = gw.amin(-1), gw.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    ref_q = torch.round((gw - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    assert torch.equal(q1, ref_q.view(40, 256).to(torch.int32))
    assert torch.equal(sz1, torch.stack([scale, zero], -1).transpose(0, 1).bfloat16())


def test_scratch_made_in_inference_mode_is_written_outside_it(monkeypatch):
    """The dequantisation buffer is process-wide: a first use under torch.inference_mode (an
    engine step) made it an inference tensor, and a later prefill-size int8 GEMM outside that
    mode raised 'Inplace update to inference tensor' (the suite hit it once the dtype benchmark
    ran an int8 engine before the decode-plan tests)."""
    monkeypatch.setattr(matmul, "_scratch", {})
    q, s = formats.quantize_int8_rows(torch.randn(24, 40), torch.float32)
    x = torch.randn(40, 40)  # more rows than the GEMV kernels take: the scratch path
    with torch.inference_mode():
        inside = matmul.int8_linear(x, q, s)
    outside = matmul.int8_linear(x, q, s)
    torch.testing.assert_close(outside, inside)
    torch.testing.assert_close(outside, x @ (q.float() * s[:, None]).T)


def _load_both_ways(monkeypatch, *args, **kwargs):
    """The model loaded with QuantizeOnRead (each module quantized as its tensors arrive), the
    QuantizeOnRead, and the model quantized after loading (the path before it)."""
    import qwen35.loader as loader

    made, bf16 = [], []
    make = loader._quantize_on_read

    def spy(*a):
        made.append(make(*a))
        alloc = made[-1].alloc

        def recorded(p):  # every unquantized tensor it allocates, weakly
            q = alloc(p)
            bf16.append(weakref.ref(q))
            return q

        made[-1].alloc = recorded
        return made[-1]

    monkeypatch.setattr(loader, "_quantize_on_read", spy)
    streamed = load_model(*args, **kwargs)
    gc.collect()
    alive = [r() for r in bf16 if r() is not None]
    assert bf16 and not alive, f"{len(alive)} of {len(bf16)} BF16 tensors still referenced"
    monkeypatch.setattr(loader, "_quantize_on_read", lambda *a: None)
    after = load_model(*args, **kwargs)
    (on_read,) = made
    return streamed, on_read, after


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tied")
    save_checkpoint(d, dtype=torch.bfloat16, tie_word_embeddings=True, **DENSE)
    return d


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tied_table_quantized_while_reading(tied_ckpt, fmt, monkeypatch):
    """A tied embedding / head: the one table becomes one int8 matrix as soon as it is read,
    shared by the head and the embedding as quantizing after loading shares it."""
    streamed, on_read, after = _load_both_ways(monkeypatch, tied_ckpt, dtype="bf16",
                                               quantization=fmt)  # fmt: skip
    _assert_same_tensors(streamed, after)
    assert streamed.model.embed_tokens.weight is streamed.lm_head.weight
    assert "model.embed_tokens.weight" in on_read.owner and "lm_head.weight" not in on_read.owner


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_quantized_while_reading_equals_quantized_after(ckpt, fmt, monkeypatch):
    """Loading quantizes each module as soon as its tensors are read, so the BF16 model is never
    whole in memory (27B to int4: ~14.5 GiB at the end where 51 GiB were held before): the
    result is the model quantizing after loading gave, bit for bit, and at most about one
    layer's unquantized weights were alive at once (the tiny model has 4 layers)."""
    streamed, on_read, after = _load_both_ways(monkeypatch, ckpt, dtype="bf16", quantization=fmt)
    _assert_same_tensors(streamed, after)
    assert streamed.quantization == after.quantization == fmt
    assert on_read.allocated > 0 and on_read.peak <= on_read.allocated / 2
    assert on_read.live == 0 and any("while reading" in n for n in streamed.load_report.notes)
    assert ("lm_head.weight" in on_read.owner) == (fmt != "fp8")  # int8 / int4: the head too
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    assert torch.equal(streamed(ids), after(ids))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_random_weights_quantized_while_drawn_equal_quantized_after(ckpt, fmt, monkeypatch):
    """Random weights (benchmarks): each module drawn, then quantized at once; the same draws in
    the same order, so the same model as drawing everything first."""
    streamed, on_read, after = _load_both_ways(
        monkeypatch, ckpt / "config.json", load_format="random", dtype="bf16", quantization=fmt,
        seed=3,
    )  # fmt: skip
    _assert_same_tensors(streamed, after)
    assert on_read.peak <= on_read.allocated / 2


def test_load_peak_is_the_planners_largest_module(ckpt, monkeypatch):
    """`qwen35 plan --dtype int4`'s load peak counts the largest module in BF16 (a MoE layer's
    experts, the embedding or head, a projection): the most unquantized weight bytes the loader
    held at once."""
    from qwen35.plan.cpu import largest_module_bytes

    streamed, on_read, _ = _load_both_ways(monkeypatch, ckpt, dtype="bf16", quantization="int4")
    assert on_read.peak == largest_module_bytes(streamed.config)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_int8_quantize_kernel_equals_pytorch_twin(wdtype, sdtype):
    """gemv_cpu.cpp's int8_quantize (what loading with --quantization int8 / int4 runs for int8
    matrices and the vocabulary tables) gives quantize_int8_rows' bits: rows of zeros (both
    signs: the 1e-12 floor), constant, tiny and large rows, odd K for the scalar tail."""
    from qwen35.kernels import gemv

    mod = gemv.load()
    if mod is None:
        pytest.skip("the CPU kernels did not build here (no compiler, or QWEN35_NO_KERNELS)")
    g = torch.Generator().manual_seed(22)
    for n, k in [(37, 50), (16, 8), (5, 3), (300, 1024)]:
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
        w[0] = 0.0
        w[1] = -0.0
        w[2] = -0.61
        w[3] *= 1e-30
        w[4] *= 1e4
        w = w.to(wdtype)
        q, s = formats.quantize_int8_rows(w, sdtype)
        q2, s2 = mod.int8_quantize(w, sdtype)
        assert torch.equal(q2, q) and s2.dtype == sdtype and torch.equal(s2, s), (n, k)
        q3, s3 = matmul.quantize_int8(w, sdtype)
        assert torch.equal(q3, q) and torch.equal(s3, s)


def test_int_experts_stack_is_views_and_same_products():
    """IntExperts.stack_ (the GPU's MoE kernels' [E, ...] tensors): every expert's int4 / int8
    weights move into one tensor per projection, the per-expert modules become views of it (no
    memory added once their own tensors are freed) and compute as before; a projection of mixed
    formats or groups across experts leaves them as they are."""
    from qwen35.quant.layers import IntExperts

    g = torch.Generator().manual_seed(0)
    E, H, I = 4, 128, 64
    gu = [Int4Linear.quantize(torch.randn(2 * I, H, generator=g), 32, torch.bfloat16)
          for _ in range(E)]  # fmt: skip
    dn = [Int4Linear.quantize(torch.randn(H, I, generator=g), 64, torch.bfloat16) for _ in range(E)]
    x = torch.randn(3, H, generator=g).to(torch.bfloat16)
    before = [m(x) for m in gu]
    ex = IntExperts(gu, dn, I)
    assert ex.stack_()
    gu_s, dn_s = ex.stack
    assert gu_s.weight.shape == (E, 2 * I, H // 2) and dn_s.scales.shape == (E, I // 64, H, 2)
    assert (gu_s.kind, gu_s.group, dn_s.group) == ("int4", 32, 64)
    for e in range(E):
        assert ex.gate_up_q[e].weight.data_ptr() == gu_s.weight[e].data_ptr()
        assert ex.down_q[e].scales_and_zeros.data_ptr() == dn_s.scales[e].data_ptr()
        assert torch.equal(ex.gate_up_q[e](x), before[e])
    # int4 gate_up beside int8 down (a GGUF Q4_K_M's experts): each projection its own kind
    dn8 = [Int8Linear.quantize(torch.randn(H, I, generator=g), torch.bfloat16) for _ in range(E)]
    h = torch.randn(3, I, generator=g).to(torch.bfloat16)
    before = [m(h) for m in dn8]
    ex = IntExperts(gu, dn8, I)
    assert ex.stack_() and ex.stack[1].kind == "int8" and ex.stack[1].scales.shape == (E, H)
    assert all(torch.equal(m(h), b) for m, b in zip(ex.down_q, before, strict=True))
    assert ex.down_q[1].weight_scale.data_ptr() == ex.stack[1].scales[1].data_ptr()
    mixed = IntExperts(gu[:1] + [Int8Linear.quantize(torch.randn(2 * I, H), torch.bfloat16)],
                       dn[:2], I)  # fmt: skip
    assert not mixed.stack_() and mixed.stack is None
    regrouped = IntExperts(gu[:2], [dn[0], Int4Linear.quantize(torch.randn(H, I), 32,
                                                               torch.bfloat16)], I)  # fmt: skip
    assert not regrouped.stack_()
