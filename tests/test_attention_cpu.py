"""The CPU paged decode attention kernel (qwen35.kernels.attention) against the PyTorch path
(gather + SDPA, ops/attention.py) and the naive reference, and its dispatch."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import native_or_skip
from qwen35 import kernels
from qwen35.devices import cpu_flags
from qwen35.kernels import attention
from qwen35.ops.attention import decode_attention, naive_attention, paged_decode_attention
from qwen35.ops.backend import reference_backend, select_backend


@pytest.fixture(scope="module")
def mod():
    return native_or_skip(attention.ATTENTION, "the CPU attention kernel")


def _cache(lens, nkv, hd, bs, dtype, seed=0):
    """K/V of each sequence in shuffled blocks of one cache: (kc, vc, tables int32, kvs)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // bs) for n in lens) + 3
    kc = torch.randn(nblocks, bs, nkv, hd, generator=g).to(dtype)
    vc = torch.randn(nblocks, bs, nkv, hd, generator=g).to(dtype)
    order = torch.randperm(nblocks, generator=g).tolist()
    width = max(-(-n // bs) for n in lens) + 1
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    kvs = []
    for i, n in enumerate(lens):
        ids = [order.pop() for _ in range(-(-n // bs))]
        tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        kvs.append((kc[ids].flatten(0, 1)[:n], vc[ids].flatten(0, 1)[:n]))
    return kc, vc, tables, kvs


@pytest.mark.parametrize("avx2_only", [False, True])  # True: a CPU without AVX512-BF16's path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "nh,nkv,hd",
    [(8, 2, 256), (4, 4, 36), (12, 2, 96)],  # 36: a tail past 4 x 8 lanes; 12 / 2: 4 + 2 heads a
)  # KV head, 96: a 32-lane rest past 64 (AVX512-BF16)
def test_decode_matches_gather_and_naive(mod, dtype, nh, nkv, hd, avx2_only):
    lens, bs = [150, 1, 37, 16], 16 if hd != 96 else 64  # 64: pages longer than a context
    kc, vc, tables, kvs = _cache(lens, nkv, hd, bs, dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), nh, hd, generator=g).to(dtype)
    gate = torch.randn(len(lens), nh, 2 * hd, generator=g).to(dtype)[..., :hd]  # strided rows
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = hd**-0.5
    out = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, avx2_only=avx2_only)
    ref = decode_attention(q, kc, vc, tables, ctx.long(), max(lens), scale).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for i, (k, v) in enumerate(kvs):  # the naive reference on the ungathered K/V
        naive = naive_attention(q[i : i + 1].float(), k.float(), v.float(), scale)[0]
        torch.testing.assert_close(out[i].float(), naive, **tol)
    gated = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, gate, avx2_only)
    torch.testing.assert_close(gated, ref.mul(torch.sigmoid(gate)), **tol)
    # batch invariance: each sequence alone gives bitwise its row of the batch
    for i in range(len(lens)):
        one = mod.paged_decode_attention(
            q[i : i + 1], kc, vc, tables[i : i + 1], ctx[i : i + 1], scale, avx2_only=avx2_only
        )
        assert torch.equal(one[0], out[i])
    # which path ran: AVX512 for bf16 caches with hd % 32 == 0 on AVX512-BF16 CPUs, for fp32 /
    # fp16 caches with hd % 16 == 0 on AVX512 CPUs
    flags = cpu_flags()
    avx512 = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    if dtype == torch.bfloat16:
        fast = hd % 32 == 0 and avx512 and "avx512_bf16" in flags
    else:
        fast = hd % 16 == 0 and avx512
    assert mod.fast_path(dtype, hd, avx2_only) == (fast and not avx2_only)
    assert not mod.fast_path(torch.int8, hd)


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,hd", [(8, 2, 256), (12, 2, 96)])
def test_long_contexts_split_into_chunks(mod, dtype, nh, nkv, hd, avx2_only):
    """Contexts over 1,024 positions are cut into chunks computed apart and merged (split-K):
    against the gather + SDPA path and the naive reference, and batched == alone (the cut
    depends on the context length only); 1,024 is one chunk, 1,025 two."""
    lens, bs = [2500, 1, 1100, 1024, 1025], 16
    kc, vc, tables, kvs = _cache(lens, nkv, hd, bs, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(len(lens), nh, hd, generator=g).to(dtype)
    gate = torch.randn(len(lens), nh, hd, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = hd**-0.5
    out = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, gate, avx2_only)
    ref = decode_attention(q, kc, vc, tables, ctx.long(), max(lens), scale).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=2e-2)
    torch.testing.assert_close(out, ref.mul(torch.sigmoid(gate)), **tol)
    plain = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, None, avx2_only)
    for i, (k, v) in enumerate(kvs):
        naive = naive_attention(q[i : i + 1].float(), k.float(), v.float(), scale)[0]
        torch.testing.assert_close(plain[i].float(), naive, **tol)
        one = mod.paged_decode_attention(
            q[i : i + 1], kc, vc, tables[i : i + 1], ctx[i : i + 1], scale, gate[i : i + 1],
            avx2_only,
        )
        assert torch.equal(one[0], out[i])


def test_bad_input_is_refused(mod):
    kc, vc, tables, _ = _cache([20], 2, 16, 8, torch.float32)
    q = torch.randn(1, 4, 16)
    with pytest.raises(RuntimeError, match="does not fit its block table row"):
        mod.paged_decode_attention(q, kc, vc, tables, torch.tensor([99], dtype=torch.int32), 1.0)
    bad = tables.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        mod.paged_decode_attention(q, kc, vc, bad, torch.tensor([20], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="caches of the model dtype, fp8 caches, or bf16 / fp16"):
        mod.paged_decode_attention(
            q.bfloat16(), kc, vc, tables, torch.tensor([20], dtype=torch.int32), 1.0
        )
    with pytest.raises(RuntimeError, match="K and V caches must share a dtype"):
        mod.paged_decode_attention(
            q, kc, vc.bfloat16(), tables, torch.tensor([20], dtype=torch.int32), 1.0
        )


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float16])
def test_fp32_model_over_half_precision_caches(mod, kv, avx2_only):
    """--kv-cache-dtype bf16 / fp16 under an fp32 model: the fp32 query against the caches is
    bitwise the kernel on the same caches widened to fp32 (the loads are exact), so it agrees
    with the gather + SDPA path and the naive reference, chunked (split-K) lengths included,
    and batched == alone; pairs it does not take are refused."""
    lens, nh, nkv, hd, bs = [2500, 1, 37, 1025], 8, 2, 256, 16
    kc, vc, tables, kvs = _cache(lens, nkv, hd, bs, kv, seed=7)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(len(lens), nh, hd, generator=g)
    gate = torch.randn(len(lens), nh, hd, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = hd**-0.5
    out = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, gate, avx2_only)
    assert out.dtype == torch.float32
    wide = mod.paged_decode_attention(q, kc.float(), vc.float(), tables, ctx, scale, gate,
                                      avx2_only)  # fmt: skip
    assert torch.equal(out, wide)
    ref = decode_attention(q, kc, vc, tables, ctx.long(), max(lens), scale)
    torch.testing.assert_close(out, ref.mul(torch.sigmoid(gate)), atol=1e-5, rtol=1e-5)
    plain = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, None, avx2_only)
    for i, (k, v) in enumerate(kvs):
        naive = naive_attention(q[i : i + 1], k.float(), v.float(), scale)[0]
        torch.testing.assert_close(plain[i], naive, atol=1e-5, rtol=1e-5)
        one = mod.paged_decode_attention(
            q[i : i + 1], kc, vc, tables[i : i + 1], ctx[i : i + 1], scale, gate[i : i + 1],
            avx2_only,
        )
        assert torch.equal(one[0], out[i])
    # the fp32 pair's path: AVX512 with hd % 16 == 0 on AVX512 CPUs
    flags = cpu_flags()
    avx512 = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    assert mod.fast_path(torch.float32, hd, avx2_only, kv) == (avx512 and not avx2_only)
    assert mod.fast_path(torch.float32, hd, avx2_only, kv) == mod.fast_path(
        torch.float32, hd, avx2_only
    )
    assert not mod.fast_path(torch.bfloat16, hd, False, torch.float16)
    assert attention.takes(torch.float32, kv) and attention.takes(kv, kv)
    assert not attention.takes(torch.bfloat16, torch.float16)
    assert not attention.takes(torch.float16, torch.bfloat16)
    other = torch.float16 if kv == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="got a .* cache under a"):
        mod.paged_decode_attention(q.to(other), kc, vc, tables, ctx, scale)


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_caches_under_any_model(mod, dtype, avx2_only):
    """--kv-cache-dtype fp8: e4m3 caches widened exactly as read (vec8::load8 / load16's fp16
    trick, subnormals and +-448 included; under a bf16 model packed to bf16 for vdpbf16ps):
    bitwise the kernel on the same caches widened to the model dtype, within the model dtype's
    rounding of the PyTorch path (gather, widen, SDPA); split-K lengths; batched == alone."""
    lens, nh, nkv, hd, bs = [2500, 1, 37, 1025], 8, 2, 256, 16
    k32, v32, tables, _ = _cache(lens, nkv, hd, bs, torch.float32, seed=9)
    k32[0, 0, 0, :8] = torch.tensor([448.0, -448.0, 2.0**-9, -(2.0**-9), 2.0**-7, 0.0, 1e-4, 300])
    kc, vc = (k32 * 4).to(torch.float8_e4m3fn), v32.to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(10)
    q = torch.randn(len(lens), nh, hd, generator=g).to(dtype)
    gate = torch.randn(len(lens), nh, hd, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = hd**-0.5 / 4
    out = mod.paged_decode_attention(q, kc, vc, tables, ctx, scale, gate, avx2_only)
    assert out.dtype == dtype
    same = mod.paged_decode_attention(q, kc.to(dtype), vc.to(dtype), tables, ctx, scale, gate,
                                      avx2_only)  # fmt: skip
    assert torch.equal(out, same)
    wide = [kc.float(), vc.float()]
    ref = decode_attention(q.float(), *wide, tables, ctx.long(), max(lens), scale)
    ref = ref.to(dtype).mul_(torch.sigmoid(gate))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for i in range(len(lens)):
        one = mod.paged_decode_attention(q[i : i + 1], kc, vc, tables[i : i + 1], ctx[i : i + 1],
                                         scale, gate[i : i + 1], avx2_only)  # fmt: skip
        assert torch.equal(one[0], out[i])
    assert attention.takes(dtype, torch.float8_e4m3fn)
    avx512 = all(f in cpu_flags() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    assert mod.fast_path(dtype, hd, avx2_only, torch.float8_e4m3fn) == (avx512 and not avx2_only)


def test_dispatch_takes_the_kernel_and_switches_off(mod, monkeypatch):
    from types import SimpleNamespace

    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(mod, name)

    monkeypatch.setattr(attention.ATTENTION, "_module", Spy())
    kc, vc, tables, _ = _cache([30, 5], 2, 32, 16, torch.float32)
    ctx = torch.tensor([30, 5], dtype=torch.int32)
    d = SimpleNamespace(block_tables=tables, context_lens=ctx, max_context=30, max_context_exact=True)
    q = torch.randn(2, 4, 32)
    be = select_backend("cpu")
    assert be.cpu_attention is not None and "cpu-attention" in be.name
    fast = paged_decode_attention(be, q, kc, vc, d, 0.2)
    assert calls == ["paged_decode_attention"]
    calls.clear()
    ref = paged_decode_attention(reference_backend("cpu"), q, kc, vc, d, 0.2)
    assert calls == []
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    assert kernels.switched_off()
    paged_decode_attention(be, q, kc, vc, d, 0.2)
    assert calls == []


@pytest.mark.parametrize(
    "dtype,kv",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),  # --kv-cache-dtype bf16 under an fp32 model
        (torch.float32, torch.float16),
        (torch.float32, torch.float8_e4m3fn),  # --kv-cache-dtype fp8
        (torch.bfloat16, torch.float8_e4m3fn),
    ],
)
def test_fused_layer_entry_equals_op_by_op(mod, dtype, kv):
    """attention_decode_gated is bitwise the op-by-op CPU path of layers/full_attention.py:
    small_ops' q / k RMSNorms and rotary, write_kv, then this kernel with the output gate; the
    projections are column slices of one packed output (strided rows); the caches get the same
    new K / V (rounded to a bf16 / fp16 cache's dtype as write_kv's tensor copy rounds)."""
    from qwen35.kernels import small_ops
    from qwen35.layers.rotary import RotaryEmbedding
    from qwen35.ops.attention import write_kv

    so = native_or_skip(small_ops.SMALL_OPS, "the small-op kernels")
    lens, nh, nkv, hd, bs, rd = [150, 1, 37], 4, 2, 64, 16, 32
    kc, vc, tables, _ = _cache(lens, nkv, hd, bs, kv)
    g = torch.Generator().manual_seed(5)
    N = len(lens)
    packed = torch.randn(N, nh * 2 * hd + 2 * nkv * hd, generator=g).to(dtype)
    qg, k, v = packed.split([nh * 2 * hd, nkv * hd, nkv * hd], dim=-1)
    qw, kw = (torch.randn(hd, generator=g) * 0.1).to(dtype), (torch.randn(hd, generator=g) * 0.1)
    kw = kw.to(dtype)
    pos = torch.tensor(lens) - 1  # the new token is the context's last
    cos, sin = RotaryEmbedding(rd, 1e7).cos_sin(pos, dtype)
    slots = torch.stack([tables[i, p // bs].long() * bs + p % bs for i, p in enumerate(pos)])
    ctx = torch.tensor(lens, dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    out = mod.attention_decode_gated(qg, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slots, tables,
                                     ctx, hd**-0.5)  # fmt: skip
    qg3 = qg.unflatten(-1, (nh, 2 * hd))
    q = so.rms_norm_zc(qg3[..., :hd], qw, 1e-6)
    kn = so.rms_norm_zc(k.unflatten(-1, (nkv, hd)), kw, 1e-6)
    so.rotary_qk_(q, kn, cos, sin)
    write_kv(kc2, vc2, kn, v.unflatten(-1, (nkv, hd)), slots)
    want = mod.paged_decode_attention(q, kc2, vc2, tables, ctx, hd**-0.5, qg3[..., hd:])
    assert out.shape == (N, nh * hd) and torch.equal(out, want.flatten(1))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    bad = slots.clone()
    bad[1] = kc.numel() // (nkv * hd)
    with pytest.raises(RuntimeError, match="slot is outside the cache"):
        mod.attention_decode_gated(qg, k, v, qw, kw, 1e-6, cos, sin, kc, vc, bad, tables, ctx,
                                   1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="share the model dtype"):
        mod.attention_decode_gated(qg, k, v, qw.double(), kw, 1e-6, cos, sin, kc, vc, slots,
                                   tables, ctx, 1.0)  # fmt: skip
