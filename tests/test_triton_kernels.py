"""Our Triton kernels (kernels/triton_attention.py: paged attention; kernels/triton_norms.py:
the RMSNorms; quant/fp8_gpu.py: the block-FP8 GEMM) against their PyTorch references, on the
CPU through Triton's interpreter or on a GPU.

The CPU test environment has no Triton (with Triton and fla-core present transformers routes its
reference to GPU kernels). Run these in a separate venv:
    python -m venv /work/venvs/gpu && /work/venvs/gpu/bin/pip install -c /work/constraints.txt \\
        torch triton numpy pytest
    TRITON_INTERPRET=1 PYTHONPATH=src /work/venvs/gpu/bin/python -m pytest -m slow \\
        tests/test_triton_kernels.py -p no:cacheprovider
On a GPU machine `pytest -m gpu tests/test_triton_kernels.py` runs them compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (see the docstring)")

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no GPU: set TRITON_INTERPRET=1 to run the kernels interpreted", allow_module_level=True
    )

from qwen35.engine.forward_batch import DecodeBatch  # noqa: E402
from qwen35.kernels import triton_attention as ta  # noqa: E402
from qwen35.kernels import triton_norms as tn  # noqa: E402
from qwen35.layers import norms  # noqa: E402
from qwen35.ops.attention import decode_attention, gather_kv, prefill_attention  # noqa: E402
from qwen35.ops.backend import Backend  # noqa: E402
from qwen35.ops.deltanet import Dims, deltanet_decode  # noqa: E402

pytestmark = pytest.mark.gpu if ON_GPU else pytest.mark.slow
DEV = "cuda" if ON_GPU else "cpu"


# Kernels that round where PyTorch rounds: fp32 within an FMA's difference; bf16 bitwise on a
# GPU, within one bf16 ulp interpreted (the interpreter's fp32 -> bf16 cast does not round to
# nearest: seen with triton 3.9, up to 2 ulp off torch's cast on randn * 3)
ROUNDING = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.bfloat16: dict(atol=0, rtol=0) if ON_GPU else dict(atol=1.6e-2, rtol=8e-3),
}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cache(num_blocks, bs, nkv, hd, dtype, g):
    k = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(DEV, dtype)
    v = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(DEV, dtype)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,nh,nkv,hd", [(16, 4, 2, 32), (4, 8, 2, 64), (16, 2, 2, 16)])
def test_paged_decode_equals_reference(dtype, bs, nh, nkv, hd):
    g = torch.Generator().manual_seed(bs + nh + hd)
    N, W = 5, 12
    kc, vc = _cache(64, bs, nkv, hd, dtype, g)
    tables = torch.stack([torch.randperm(64, generator=g)[:W] for _ in range(N)]).int().to(DEV)
    lens = torch.tensor([1, 7, bs * W, 33, bs + 1], dtype=torch.int32).clamp(max=bs * W).to(DEV)
    q = torch.randn(N, nh, hd, generator=g).to(DEV, dtype)
    gate = torch.randn(N, nh, hd, generator=g).to(DEV, dtype)
    scale = hd**-0.5
    ref = decode_attention(q, kc, vc, tables, lens, int(lens.max()), scale)
    got = ta.paged_decode_attention(q, kc, vc, tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and _rel(got, ref) < tol
    gated = ta.paged_decode_attention(q, kc, vc, tables, lens, scale, gate)
    assert _rel(gated, ref.float() * torch.sigmoid(gate.float())) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,Tq", [(0, 9), (37, 20), (5, 40)])
def test_paged_prefill_equals_reference(dtype, start, Tq):
    g = torch.Generator().manual_seed(start + Tq)
    bs, nh, nkv, hd = 8, 4, 2, 32
    ctx = start + Tq
    nb = -(-ctx // bs)
    kc, vc = _cache(32, bs, nkv, hd, dtype, g)
    row = torch.randperm(32, generator=g)[: nb + 2].int().to(DEV)
    q = torch.randn(Tq, nh, hd, generator=g).to(DEV, dtype)
    scale = hd**-0.5
    kk, vv = gather_kv(kc, row, ctx), gather_kv(vc, row, ctx)
    ref = prefill_attention(q, kk, vv, scale)
    got = ta.paged_prefill_attention(q, kc, vc, row, start, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(got, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_equal_reference(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 3, 48, generator=g) * 3).to(DEV, dtype)
    z = torch.randn(5, 3, 48, generator=g).to(DEV, dtype)
    w = torch.randn(48, generator=g).to(DEV, dtype)
    # bf16: the fp32 statistics differ in the last bits (one rsqrt vs torch's op sequence), which
    # can move a bf16 rounding by an ulp (two in the gated norm, which rounds twice)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=3e-2)
    torch.testing.assert_close(tn.rms_norm_zc(x, w, 1e-6), norms.rms_norm_zc(x, w, 1e-6), **tol)
    xs = x[:, :, :32]  # a strided view
    torch.testing.assert_close(
        tn.rms_norm_zc(xs, w[:32], 1e-6), norms.rms_norm_zc(xs, w[:32], 1e-6), **tol
    )
    got = tn.gated_rms_norm(x, z, w, 1e-6)
    assert got.dtype == dtype
    torch.testing.assert_close(got, norms.gated_rms_norm(x, z, w, 1e-6), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("all_rows", [True, False])
def test_deltanet_decode_kernels_equal_gather_path(dtype, all_rows):
    """Three decode steps through the Triton kernels (states in their slots) and through the
    PyTorch gather path: outputs, conv and recurrent caches; slots 4, 1, 6 of 8."""
    g = torch.Generator().manual_seed(11)
    dims = Dims(nk=2, nv=4, dk=16, dv=16, kernel_size=4)
    C = 2 * dims.nk * dims.dk + dims.nv * dims.dv
    N, T = 3, 3 if all_rows else 5
    rows = torch.arange(N) if all_rows else torch.tensor([4, 0, 2])
    d = DecodeBatch(
        rows=rows.to(DEV), block_tables=torch.zeros(N, 1, dtype=torch.int32, device=DEV),
        context_lens=torch.ones(N, dtype=torch.int32, device=DEV),
        state_slots=torch.tensor([4, 1, 6], device=DEV), max_context=1, all_rows=all_rows,
    )  # fmt: skip
    w = (torch.randn(C, 1, 4, generator=g) * 0.5).to(DEV, dtype)[:, 0, :]
    conv = torch.randn(8, C, 3, generator=g).to(DEV, dtype)
    rec = (torch.randn(8, dims.nv, dims.dk, dims.dv, generator=g) * 0.1).to(DEV)
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for _ in range(3):
        packed = torch.randn(T, C + 7, generator=g).to(DEV, dtype)
        qkv = packed[:, :C]  # a column slice, as the packed projection gives it
        gl = -torch.rand(T, dims.nv, generator=g).to(DEV)
        beta = torch.rand(T, dims.nv, generator=g).to(DEV, dtype)
        o1 = torch.zeros(T, dims.nv, dims.dv, dtype=dtype, device=DEV)
        o2 = o1.clone()
        deltanet_decode(
            Backend("cuda", triton_deltanet=True), qkv, gl, beta, w, dims, d, c1, r1, o1
        )
        deltanet_decode(Backend("cuda"), qkv, gl, beta, w, dims, d, c2, r2, o2)
        torch.testing.assert_close(o1, o2, **tol)
        torch.testing.assert_close(c1, c2, **tol)
        torch.testing.assert_close(r1, r2, **tol)
    assert not torch.equal(r1, rec) and torch.equal(r1[0], rec[0])  # only its slots moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_qk_equals_reference(dtype):
    """q and k rotated in place in one launch, partial rotary (8 of 32 dims, and all 64 of 64),
    q a strided view as the q_norm output can be."""
    from qwen35.kernels import triton_pointwise as tp
    from qwen35.layers.rotary import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(3)
    for hd, rd in ((32, 8), (64, 64)):
        T, nh, nkv = 7, 4, 2
        pos = torch.tensor([0, 1, 5, 9, 300, 4000, 17]).to(DEV)
        cos, sin = RotaryEmbedding(rd, 1e7).cos_sin(pos, dtype)
        q = torch.randn(T, nh, 2 * hd, generator=g).to(DEV, dtype)[..., :hd]  # strided rows
        k = torch.randn(T, nkv, hd, generator=g).to(DEV, dtype)
        want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        tp.rotary_qk_(q, k, cos, sin)
        torch.testing.assert_close(q, want_q, **ROUNDING[dtype])
        torch.testing.assert_close(k, want_k, **ROUNDING[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_and_add_rms_norm_equal_reference(dtype):
    from qwen35.kernels import triton_pointwise as tp
    from qwen35.ops.pointwise import silu_mul_reference

    g = torch.Generator().manual_seed(4)
    # bf16: two roundings, each within two ulp interpreted (ROUNDING), and exp differs
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2e-2)
    gu = (torch.randn(6, 2 * 40, generator=g) * 3).to(DEV, dtype)  # a packed gate_up output
    gate, up = gu.chunk(2, dim=-1)
    want = silu_mul_reference(gate, up)
    torch.testing.assert_close(tp.silu_mul(gate, up), want, **tol)
    h = (torch.randn(5, 48, generator=g) * 3).to(DEV, dtype)
    x = torch.randn(5, 48, generator=g).to(DEV, dtype)
    w = torch.randn(48, generator=g).to(DEV, dtype)
    h_ref = h.clone().add_(x)
    y = tn.add_rms_norm_zc_(h, x, w, 1e-6)
    torch.testing.assert_close(h, h_ref, **ROUNDING[dtype])  # the residual, as h.add_(x)
    torch.testing.assert_close(y, norms.rms_norm_zc(h_ref, w, 1e-6), **tol)


@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (7, 384, 1024), (130, 200, 333)])
def test_block_fp8_kernel_matches_dequantised_reference(M, N, K):
    """quant/fp8_gpu.py's Triton kernel (the path where torch's blockwise _scaled_mm is missing):
    partial last blocks in N and K, 1..130 rows. Its only error is the per-token-group e4m3
    quantization of the activations (~2^-5 relative, averaged over K)."""
    from qwen35.quant import fp8_gpu
    from qwen35.quant.formats import dequantize_fp8_blocks, quantize_fp8_blocks

    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w, s = quantize_fp8_blocks(torch.randn(N, K, generator=g) * 0.05)
    x, w, s = x.to(DEV), w.to(DEV), s.float().to(DEV)
    y = fp8_gpu._triton_kernel()(x, w, s, (128, 128))
    want = fp8_gpu.reference(x, w, s, (128, 128))
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert _rel(y, want) < 0.03
    # that error is all: against the same quantized activations the kernel is exact up to fp32
    # summation order (fp32 output: no final rounding; the interpreter's bf16 cast truncates)
    x32 = x.float()
    xq, xs = fp8_gpu.quantize_activations(x32)
    x_deq = xq.float() * xs.repeat_interleave(128, 1)[:, :K]
    w_deq = dequantize_fp8_blocks(w, s, torch.float32, (128, 128))
    assert _rel(fp8_gpu._triton_kernel()(x32, w, s, (128, 128)), x_deq @ w_deq.T) < 1e-5
