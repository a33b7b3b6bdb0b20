"""kernels/attention_prefill_cpu.cpp: causal prefill attention of bf16 models (AVX512-BF16 CPUs)
and fp32 ones (AVX2) over the paged cache. Against a float64 reference (bf16 / fp32 tolerance),
bitwise independent of how a prompt is cut into chunks, of the block table's layout and of the
thread count; the engine's whole, chunked and prefix-hit prefills agree bitwise through it."""

from __future__ import annotations

import math

import pytest
import torch

from qwen35.kernels import attention

mod = attention.load_prefill()
pytestmark = pytest.mark.skipif(
    mod is None, reason="the prefill attention kernel needs an AVX2 CPU and a compiler"
)
BF16 = mod is not None and mod.bf16_supported()
# (model dtype, tolerance): bf16 outputs and P in bf16; fp32 throughout
DTYPES = [
    pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
        not BF16, reason="bf16 queries take the kernel on AVX512-BF16 CPUs only")),
    (torch.float32, 1e-5),
]  # fmt: skip


def reference(q, k, v, start, scale):
    """float64 softmax(q k^T scale, causal at positions start..) v over bf16 inputs."""
    Tq, nh, _ = q.shape
    R = nh // k.shape[1]
    kf, vf = (t.double().repeat_interleave(R, 1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.double(), kf) * scale
    pos = torch.arange(start, start + Tq)[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None] > pos, -math.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vf)


def paged(k, v, bs, g, dtype=torch.bfloat16, spare=3):
    """k, v [ctx, nkv, hd] in a cache of shuffled blocks (others random), and the block row."""
    ctx, nkv, hd = k.shape
    nb = -(-ctx // bs)
    kc = torch.randn(nb + spare, bs, nkv, hd, generator=g).to(dtype)
    vc = torch.randn(nb + spare, bs, nkv, hd, generator=g).to(dtype)
    row = torch.randperm(nb + spare, generator=g)[:nb].to(torch.int32)
    for i in range(nb):
        n = min(bs, ctx - i * bs)
        kc[row[i], :n], vc[row[i], :n] = k[i * bs : i * bs + n], v[i * bs : i * bs + n]
    return kc, vc, row


@pytest.mark.parametrize(
    "hd,nh,nkv,ctx,start",
    [(32, 4, 2, 70, 0), (32, 2, 2, 1, 0), (64, 6, 1, 200, 199), (96, 3, 3, 130, 64),
     (128, 16, 4, 129, 128), (256, 8, 2, 300, 0), (256, 8, 2, 300, 177)],
)  # fmt: skip
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_equals_the_reference(hd, nh, nkv, ctx, start, dtype, tol):
    """Head dims 32-256 (bf16: the 128 / 64 / 32 output tiles), GQA groups 1-6, first chunks and
    chunks after a prefix, contexts across key blocks of 64 and pages of 16."""
    g = torch.Generator().manual_seed(hd + ctx)
    q = torch.randn(ctx - start, nh, hd, generator=g).to(dtype)
    k, v = (torch.randn(ctx, nkv, hd, generator=g).to(dtype) for _ in range(2))
    kc, vc, row = paged(k, v, 16, g, dtype)
    o = mod.prefill_attention(q, kc, vc, row, start, hd**-0.5)
    assert o.dtype == dtype and o.shape == q.shape
    ref = reference(q, k, v, start, hd**-0.5)
    # bf16: the output (2^-9 relative) and P rounded to bf16 as SDPA rounds it
    torch.testing.assert_close(o.double(), ref, atol=tol, rtol=tol / 2)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_narrower_caches_read_as_their_values(dtype, tol):
    """fp8 caches (and, under fp32, bf16 / fp16 ones): the kernel over the values they hold,
    widened exactly: bitwise what caches of the model dtype holding those values give."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(90, 4, 64, generator=g).to(dtype)
    narrower = [torch.float8_e4m3fn] + ([torch.bfloat16, torch.float16] if dtype == torch.float32 else [])
    for kvd in narrower:
        k, v = (torch.randn(150, 2, 64, generator=g).to(kvd) for _ in range(2))
        kc, vc, row = paged(k, v, 16, g, kvd)
        o = mod.prefill_attention(q, kc, vc, row, 60, 0.125)
        kw, vw, roww = paged(k.to(dtype), v.to(dtype), 16, g, dtype)
        assert torch.equal(o, mod.prefill_attention(q, kw, vw, roww, 60, 0.125)), kvd
        torch.testing.assert_close(o.double(), reference(q, k.to(dtype), v.to(dtype), 60, 0.125),
                                   atol=tol, rtol=tol / 2)  # fmt: skip


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_bitwise_whatever_the_cut_the_pages_and_the_threads(dtype, tol):
    """A 333-token context: all queries at once, in chunks of 100 / 7 / 16 / 54 / 156 after their
    prefix (7 and 16: one query block, whose task packs each key block as it reaches it),
    in other block sizes and tables, with 1 and 2 threads (fp32: 8 and 16 lanes): the same bits
    for every query."""
    g = torch.Generator().manual_seed(5)
    nh, nkv, hd, ctx = 8, 2, 128, 333
    q = torch.randn(ctx, nh, hd, generator=g).to(dtype)
    k, v = (torch.randn(ctx, nkv, hd, generator=g).to(dtype) for _ in range(2))
    kc, vc, row = paged(k, v, 16, g, dtype)
    whole = mod.prefill_attention(q, kc, vc, row, 0, 0.1)
    parts, s = [], 0
    for n in (100, 7, 16, 54, 156):
        parts.append(mod.prefill_attention(q[s : s + n].contiguous(), kc, vc, row, s, 0.1))
        s += n
    assert torch.equal(torch.cat(parts), whole)
    kc8, vc8, row8 = paged(k, v, 8, g, dtype, spare=11)
    assert torch.equal(mod.prefill_attention(q, kc8, vc8, row8, 0, 0.1), whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(mod.prefill_attention(q, kc, vc, row, 0, 0.1), whole)
    finally:
        torch.set_num_threads(threads)
    if dtype == torch.float32:  # the 8-lane tiles (AVX2 CPUs) give the 16-lane ones' bits
        assert torch.equal(mod.prefill_attention(q, kc, vc, row, 0, 0.1, avx2_only=True), whole)
        for hd2 in (32, 96):  # the 32-wide P V passes
            q2, k2, v2 = q[..., :hd2].contiguous(), k[..., :hd2].contiguous(), v[..., :hd2].contiguous()
            kc2, vc2, row2 = paged(k2, v2, 16, g, dtype)
            assert torch.equal(mod.prefill_attention(q2, kc2, vc2, row2, 0, 0.1),
                               mod.prefill_attention(q2, kc2, vc2, row2, 0, 0.1, avx2_only=True))


def test_bad_inputs_are_refused_with_what_was_wrong():
    q = torch.zeros(4, 2, 32)
    kc = torch.zeros(2, 16, 1, 32)
    row = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="bf16 or fp32 contiguous expected"):
        mod.prefill_attention(q.half(), kc, kc, row, 0, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        mod.prefill_attention(q[..., :16].contiguous(), kc[..., :16].contiguous(),
                              kc[..., :16].contiguous(), row, 0, 1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="shorter than the context"):
        mod.prefill_attention(q, kc, kc, row, 40, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        mod.prefill_attention(q, kc, kc, row.long(), 0, 1.0)
    with pytest.raises(RuntimeError, match="bf16 takes bf16 or fp8"):
        mod.prefill_attention(q, kc.to(torch.int8), kc.to(torch.int8), row, 0, 1.0)
    if not BF16:
        with pytest.raises(RuntimeError, match="bf16 queries need an AVX512-BF16 CPU"):
            mod.prefill_attention(q.bfloat16(), kc.bfloat16(), kc.bfloat16(), row, 0, 1.0)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_engine_whole_chunked_and_prefix_hit_prefills_agree(tmp_path, monkeypatch, dtype, tol):
    """An engine takes the kernel for every prompt chunk; a prompt prefilled whole, in
    chunks of 32 tokens and after a prefix hit gives the same tokens and logprobs: bit for bit in
    bf16; in fp32 within 1e-5 (there chunks of up to 48 rows take the GEMV kernels for their
    projections, whose last bits differ from the GEMM's, and the chunked DeltaNet sums in
    another order: not attention matters, as before this kernel)."""
    from qwen35 import LLM
    from qwen35.request import SamplingParams
    from tiny import save_checkpoint

    save_checkpoint(tmp_path, moe=False, dtype=torch.float32)
    calls = []
    real = mod.prefill_attention
    monkeypatch.setattr(mod, "prefill_attention", lambda *a: calls.append(a[4]) or real(*a))
    prompt = [(7 * i) % 250 + 2 for i in range(70)]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)

    def run(**kw):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        llm = LLM(str(tmp_path), dtype=name, verbose=False, max_model_len=128, **kw)
        out = llm.generate([prompt], sp)[0]
        if kw.get("enable_prefix_caching"):  # again: the prompt's blocks now cached
            out = llm.generate([prompt], sp)[0]
            assert out.num_cached_tokens > 0
        return out.outputs[0].token_ids, out.outputs[0].logprobs

    def same(a, b):
        if dtype == torch.bfloat16:
            return a == b
        pairs = zip(a[1], b[1], strict=True)
        return a[0] == b[0] and all(abs(x.logprob - y.logprob) < tol for x, y in pairs)

    whole = run(enable_prefix_caching=False)
    assert calls == [0]  # the whole prompt at once, through the kernel
    assert same(run(enable_prefix_caching=False, max_num_batched_tokens=32), whole)
    assert calls[1:4] == [0, 32, 64]
    assert same(run(enable_prefix_caching=True), whole)
    assert calls[-1] > 0  # after the cached prefix
