"""lm_head under int4 in 6-bit groups of 32 (quant/formats.py quantize_int6_groups,
kernels/int6_cpu.cpp): the layout against a scalar packer, the kernel against its PyTorch twin
(fp32 / bf16 rows, zero groups, outliers, NaN), rows alone == batched bit for bit, the AVX512-VNNI path == the AVX2 one bit for bit, more than
16 rows and the path without the kernel, and int4 models (tied and untied) holding it with the
planner's bytes."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import rows_alone_mismatches
from qwen35.kernels import gemv
from qwen35.loader import load_model
from qwen35.plan.params import Tensor, tensor_bytes
from qwen35.quant import formats, matmul
from qwen35.quant.layers import Int6Embedding, Int6Linear, Int8Embedding
from tiny import save_checkpoint


def _kernel():
    mod = gemv.load_int6()
    if mod is None:
        pytest.skip("int6_cpu.cpp did not load (no compiler / AVX2, or QWEN35_NO_KERNELS=1)")
    return mod


def _pack_scalar(q: torch.Tensor) -> torch.Tensor:
    """The documented layout, byte by byte: q [N, K] in [-31, 31] -> [N, K / 64 * 48]."""
    N, K = q.shape
    u = (q.to(torch.int32) + 32).tolist()
    out = []
    for row in u:
        b = []
        for blk in range(0, K, 64):
            g = [row[blk : blk + 32], row[blk + 32 : blk + 64]]
            for grp in g:  # low nibbles: byte j = input j | input j + 16 << 4
                b += [(grp[j] & 15) | ((grp[j + 16] & 15) << 4) for j in range(16)]
            b += [(g[0][r] >> 4) | ((g[1][r] >> 4) << 2) | ((g[0][16 + r] >> 4) << 4)
                  | ((g[1][16 + r] >> 4) << 6) for r in range(16)]  # fmt: skip
        out.append(b)
    return torch.tensor(out, dtype=torch.uint8)


def test_layout_codes_and_scales():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 192, generator=g)
    w[1, :32] = 0  # a zero group
    w[2, 70] = 40.0  # an outlier: its group's step only
    packed, scales = formats.quantize_int6_groups(w)
    assert packed.shape == (5, 3 * 48) and scales.shape == (5, 6) and scales.dtype == torch.bfloat16
    s = scales.float().repeat_interleave(32, 1)
    q = torch.round(w / s).clamp(-31, 31)
    assert torch.equal(formats.int6_codes(packed).float(), q)
    assert torch.equal(packed, _pack_scalar(q))
    assert torch.equal(formats.dequantize_int6(packed, scales), q * s)
    gmax = q.view(5, 6, 32).abs().amax(-1)  # each group's amax lands on 31 (but the zero group)
    assert ((gmax == 31) | (w.view(5, 6, 32).abs().amax(-1) == 0)).all()
    assert (formats.dequantize_int6(packed, scales) - w).abs().max() <= s.max() / 2 + 1e-6
    with pytest.raises(ValueError, match="blocks of 64"):
        formats.quantize_int6_groups(torch.randn(3, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(1001, 64), (300, 1024), (77, 192)])
def test_kernel_matches_reference(dtype, N, K):
    mod = _kernel()
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    w[3, :32] = 0
    w[7, 5] = 2.0
    packed, scales = formats.quantize_int6_groups(w)
    for M in (1, 3, 16):
        x = torch.randn(M, K, generator=g).to(dtype)
        x[0, 32:64] = 0  # a zero group of the input
        y = mod.linear_int6(x, packed, scales)
        assert y.dtype == dtype and y.shape == (M, N)
        ref = formats.int6_linear_reference(x.float(), packed, scales)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    x = torch.randn(2, K, generator=g)
    x[1, 3] = float("nan")
    y = mod.linear_int6(x, packed, scales)
    assert y[1].isnan().all() and y[0].isfinite().all()
    # no rows (a step whose rows all stop short of their logits): an empty result, no crash (the
    # passes' row count once divided by zero here: SIGFPE)
    assert mod.linear_int6(torch.zeros(0, K, dtype=dtype), packed, scales).shape == (0, N)


@pytest.mark.parametrize("K", [320, 2048])  # 2,048: passes of 4 rows, in tiles of output rows
def test_rows_alone_equal_batched(K):
    mod = _kernel()
    g = torch.Generator().manual_seed(3)
    packed, scales = formats.quantize_int6_groups(torch.randn(4099, K, generator=g))
    x = torch.randn(16, K, generator=g)
    got = rows_alone_mismatches(lambda r: mod.linear_int6(r, packed, scales), x)
    assert all(v == 0 for v in got.values()), got


@pytest.mark.parametrize("K", [64, 192, 1024])  # one block, an odd last one, pairs only
def test_vnni_path_equals_avx2_path_bit_for_bit(K):
    """The AVX512-VNNI path (two blocks a pass, up to 8 rows) gives the AVX2 path's bits at
    every row count, outliers, zero groups and NaN rows included (what Zen 3 computes is what
    Zen 4 / Sapphire Rapids compute)."""
    mod = _kernel()
    if not mod.int6_vnni_supported():
        pytest.skip("this CPU has no AVX512-VNNI (QWEN35_CPU_ISA=avx2, or an AVX2-only CPU)")
    g = torch.Generator().manual_seed(K)
    w = torch.randn(701, K, generator=g) * 0.05
    w[3, :32] = 0
    w[7, 5] = 3.0
    packed, scales = formats.quantize_int6_groups(w)
    for M in (1, 2, 4, 5, 8, 9, 16):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(M, K, generator=g) * 4).to(dtype)
            x[0, :32] = 0
            if M > 4:
                x[4, K - 1] = float("nan")
            a = mod.linear_int6(x, packed, scales)
            b = mod.linear_int6(x, packed, scales, avx2_only=True)
            assert torch.equal(a, b) if M <= 4 else torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_many_rows_and_without_the_kernel(monkeypatch):
    _kernel()
    g = torch.Generator().manual_seed(4)
    packed, scales = formats.quantize_int6_groups(torch.randn(500, 128, generator=g))
    x = torch.randn(2, 19, 128, generator=g)
    y = matmul.int6_linear(x, packed, scales)  # 38 rows: calls of 16, 16, 6
    flat = x.reshape(38, 128)
    want = torch.cat([gemv.load_int6().linear_int6(flat[i : i + 16], packed, scales)
                      for i in (0, 16, 32)])  # fmt: skip
    assert y.shape == (2, 19, 500) and torch.equal(y.reshape(38, 500), want)
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    monkeypatch.setattr(matmul, "INT6_VOCAB_CHUNK", 128)  # the chunks of the fallback too
    ref = matmul.int6_linear(x, packed, scales)
    torch.testing.assert_close(ref, y, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_int4_models_keep_the_head_in_int6(tmp_path, tied):
    save_checkpoint(tmp_path, dtype=torch.bfloat16, moe=False, intermediate_size=128,
                    tie_word_embeddings=tied)  # fmt: skip
    ref = load_model(tmp_path, dtype="bf16")
    m = load_model(tmp_path, dtype="bf16", quantization="int4")
    head, emb = m.lm_head, m.model.embed_tokens
    assert isinstance(head, Int6Linear)
    assert isinstance(emb, Int6Embedding if tied else Int8Embedding)
    if tied:  # one matrix: the looked-up rows are the head's rows
        assert emb.weight is head.weight
        ids = torch.tensor([0, 5, 255, 5])
        torch.testing.assert_close(emb(ids).float(), head.dequantized(torch.float32)[ids],
                                   atol=0, rtol=1e-2)  # fmt: skip
    V, H = m.config.vocab_size, m.config.hidden_size
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    t = Tensor(name, "text", (V, H), split="vocab", embedding=False)
    assert head.weight.numel() + head.weight_scale.numel() * 2 == tensor_bytes(t, "int4")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    cos = torch.nn.functional.cosine_similarity(m(ids).flatten(0, 1).float(),
                                                ref(ids).flatten(0, 1).float(), dim=-1)  # fmt: skip
    assert cos.mean() > 0.98 and cos.min() > 0.9
    # int8 keeps the per-row int8 head
    assert not isinstance(load_model(tmp_path, dtype="bf16", quantization="int8").lm_head,
                          Int6Linear)  # fmt: skip


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_kernel_equals_pytorch_twin(wdtype):
    mod = _kernel()
    g = torch.Generator().manual_seed(6)
    w = torch.randn(97, 320, generator=g) * 0.1
    w[0, :32] = 0  # a zero group
    w[1, 64:96] = 1e-38  # a tiny one: scale clamped to 1e-30
    w[2, 5] = 1e4  # an outlier
    w[3, :32] = torch.tensor([31.0] + [i + 0.5 for i in range(-15, 16)])  # scale 1: exact halves
    w = w.to(wdtype)
    got = mod.int6_quantize(w)
    want = formats.quantize_int6_groups(w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(matmul.quantize_int6(w), want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_kernel_equals_dequantised_rows(dtype):
    mod = _kernel()
    g = torch.Generator().manual_seed(8)
    packed, scales = formats.quantize_int6_groups(torch.randn(50, 192, generator=g))
    ids = torch.tensor([3, 0, 49, 3, 17])
    want = formats.dequantize_int6(packed[ids], scales[ids], dtype)
    got = mod.int6_rows(packed, scales, ids, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert mod.int6_rows(packed, scales, ids[:0], dtype).shape == (0, 192)
    with pytest.raises(RuntimeError, match="an id outside"):
        mod.int6_rows(packed, scales, torch.tensor([50]), dtype)
