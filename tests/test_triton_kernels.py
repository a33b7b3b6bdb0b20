"""Our Triton kernels (kernels/triton_attention.py: paged attention, split-K; kernels/triton_norms.py:
the RMSNorms; kernels/triton_pointwise.py: rotary, SiLU*mul, the attention inputs of a decode step;
kernels/triton_deltanet.py: DeltaNet decode with its gates; kernels/triton_moe.py: the MoE block of
a few tokens, plain and FP8; quant/fp8_gpu.py: the block-FP8 GEMM and the weight-only FP8 GEMV;
kernels/triton_fp8.py: e4m3 read as bytes)
against their PyTorch references, on the CPU through Triton's interpreter or on a GPU.

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
from qwen35.kernels.triton_fp8 import UNSCALE, bits, e4m3_to_fp16  # noqa: E402
from qwen35.layers import norms  # noqa: E402
from qwen35.ops.attention import decode_attention, gather_kv, prefill_attention  # noqa: E402
from qwen35.ops.backend import Backend  # noqa: E402
from qwen35.ops.deltanet import (  # noqa: E402
    Dims,
    deltanet_decode,
    deltanet_decode_gated,
    deltanet_gates,
)

pytestmark = pytest.mark.gpu if ON_GPU else pytest.mark.slow
tl = triton.language
DEV = "cuda" if ON_GPU else "cpu"
# the Triton DeltaNet decode and norms (interpreted on CPU tensors when there is no GPU)
TRITON_DN = Backend("cuda", triton_deltanet=True, triton_norms=True, interpret=not ON_GPU)


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


# (dtype, cache dtype): the model's own, or fp8 caches (--kv-cache-dtype fp8) widened as read
KV_PAIRS = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float8_e4m3fn),
            (torch.float32, torch.float8_e4m3fn)]  # fmt: skip


@pytest.mark.parametrize("dtype,kv", KV_PAIRS)
@pytest.mark.parametrize("bs,nh,nkv,hd", [(16, 4, 2, 32), (4, 8, 2, 64), (16, 2, 2, 16)])
def test_paged_decode_equals_reference(dtype, kv, bs, nh, nkv, hd):
    g = torch.Generator().manual_seed(bs + nh + hd)
    N, W = 5, 12
    kc, vc = _cache(64, bs, nkv, hd, kv or dtype, g)
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
    # split-K: contexts cut into ranges of 32 / 64 tokens (up to 6 used splits; the grid
    # covers the longest possible context, short ones use one split), merged by the combine kernel
    for split_tokens in (32, 64)[: 1 + (bs * W > 64)]:
        kw = dict(max_context=bs * W, split_tokens=split_tokens)
        assert ta.num_splits(bs * W, split_tokens) > 1
        got_s = ta.paged_decode_attention(q, kc, vc, tables, lens, scale, gate, **kw)
        torch.testing.assert_close(got_s.float(), gated.float(),
                                   **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32
                                      else dict(atol=2e-2, rtol=2e-2)))  # fmt: skip
        assert _rel(ta.paged_decode_attention(q, kc, vc, tables, lens, scale, **kw), ref) < tol
        # a one-split context: bitwise the unsplit result
        short = lens <= split_tokens
        assert short.any() and torch.equal(got_s[short], gated[short])
        # each row depends on its own context only: alone, in a smaller grid == in the batch
        for i in range(N):
            alone = ta.paged_decode_attention(q[i : i + 1], kc, vc, tables[i : i + 1],
                                              lens[i : i + 1], scale, gate[i : i + 1],
                                              max_context=int(lens[i]), split_tokens=split_tokens)  # fmt: skip
            assert torch.equal(alone, got_s[i : i + 1])


def test_decode_split_count():
    """The grid's split dimension covers the largest possible context in SPLIT_TOKENS ranges,
    at most MAX_SPLITS."""
    assert ta.num_splits(None) == 1
    assert ta.num_splits(ta.SPLIT_TOKENS) == 1
    assert ta.num_splits(ta.SPLIT_TOKENS + 1) == 2
    assert ta.num_splits(10**6) == ta.MAX_SPLITS


@pytest.mark.parametrize("dtype,kv", KV_PAIRS)
@pytest.mark.parametrize("start,Tq", [(0, 9), (37, 20), (5, 40)])
def test_paged_prefill_equals_reference(dtype, kv, start, Tq):
    g = torch.Generator().manual_seed(start + Tq)
    bs, nh, nkv, hd = 8, 4, 2, 32
    ctx = start + Tq
    nb = -(-ctx // bs)
    kc, vc = _cache(32, bs, nkv, hd, kv or dtype, g)
    row = torch.randperm(32, generator=g)[: nb + 2].int().to(DEV)
    q = torch.randn(Tq, nh, hd, generator=g).to(DEV, dtype)
    scale = hd**-0.5
    kk, vv = gather_kv(kc, row, ctx).to(dtype), gather_kv(vc, row, ctx).to(dtype)
    ref = prefill_attention(q, kk, vv, scale)
    got = ta.paged_prefill_attention(q, kc, vc, row, start, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(got, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_paths_are_timed_and_agree(dtype):
    """engine/preflight.py's start-up choice runs both ways a chunk after a cached prefix can
    attend (the paged kernel; the context gathered for SDPA with a bottom-right causal bias)
    for real, and both give the reference's output."""
    import dataclasses
    from types import SimpleNamespace

    from qwen35.engine.preflight import time_chunk_attention
    from qwen35.ops.attention import cached_prefill_attention

    be = Backend("cuda", triton_attention=True, interpret=not ON_GPU)
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    times = time_chunk_attention(cfg, dtype, torch.device(DEV), be, 8, queries=6, start=30,
                                 reps=1)  # fmt: skip
    assert all(0 < t < float("inf") for t in times.values()), times
    g = torch.Generator().manual_seed(3)
    start, Tq, scale = 29, 7, 32**-0.5
    kc, vc = _cache(32, 8, 2, 32, dtype, g)
    row = torch.randperm(32, generator=g)[:6].int().to(DEV)
    q = torch.randn(Tq, 4, 32, generator=g).to(DEV, dtype)
    ref = prefill_attention(q, gather_kv(kc, row, start + Tq), gather_kv(vc, row, start + Tq), scale)
    for path in ("triton", "sdpa"):
        got = cached_prefill_attention(dataclasses.replace(be, chunk_attention=path), q, kc, vc,
                                       row, start, scale)  # fmt: skip
        assert _rel(got, ref) < (1e-5 if dtype == torch.float32 else 2e-2), path


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
    # z as the packed projection gives it: [T, nh, D] heads of a column slice (token stride
    # 3 * 48 + 5), read in place
    zp = torch.randn(5, 3 * 48 + 5, generator=g).to(DEV, dtype)[:, 5:].unflatten(-1, (3, 48))
    assert not zp.is_contiguous()
    torch.testing.assert_close(
        tn.gated_rms_norm(x, zp, w, 1e-6), norms.gated_rms_norm(x, zp, w, 1e-6), **tol
    )


@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("all_rows", [True, False])
def test_deltanet_decode_kernels_equal_gather_path(dtype, all_rows, state):
    """Three decode steps through the Triton kernels (states in their slots) and through the
    PyTorch gather path: outputs, conv and recurrent caches; slots 4, 1, 6 of 8. state: the
    recurrent states' dtype (bf16: --mamba-ssm-cache-dtype bf16, stepped in fp32, stored
    rounded)."""
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
    rec = (torch.randn(8, dims.nv, dims.dk, dims.dv, generator=g) * 0.1).to(DEV, state)
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    # bf16 states: the two paths' fp32 states a few ulps apart may round to neighbouring bf16s
    # (and so the outputs of the steps after the first)
    if state == torch.bfloat16 and dtype == torch.float32:
        tol = dict(atol=4e-3, rtol=1e-2)
    for _ in range(3):
        packed = torch.randn(T, C + 7, generator=g).to(DEV, dtype)
        qkv = packed[:, :C]  # a column slice, as the packed projection gives it
        gl = -torch.rand(T, dims.nv, generator=g).to(DEV)
        beta = torch.rand(T, dims.nv, generator=g).to(DEV, dtype)
        o1 = torch.zeros(T, dims.nv, dims.dv, dtype=dtype, device=DEV)
        o2 = o1.clone()
        deltanet_decode(TRITON_DN, qkv, gl, beta, w, dims, d, c1, r1, o1)
        deltanet_decode(Backend("cuda"), qkv, gl, beta, w, dims, d, c2, r2, o2)
        torch.testing.assert_close(o1, o2, **tol)
        torch.testing.assert_close(c1, c2, **tol)
        torch.testing.assert_close(r1.float(), r2.float(), **tol)
    assert r1.dtype == state
    assert not torch.equal(r1, rec) and torch.equal(r1[0], rec[0])  # only its slots moved


def _gate_inputs(T, nv, dtype, g):
    """a / b as column slices of one packed projection; a + dt_bias spans softplus' branches
    (below -20, near 0, above its threshold 20)."""
    packed = torch.randn(T, 2 * nv + 3, generator=g) * 8
    packed[0, :nv] = torch.tensor([-40.0, -0.5, 0.0, 25.0])[:nv]
    packed = packed.to(DEV, dtype)
    dt_bias = torch.randn(nv, generator=g).to(DEV, dtype)
    A_log = torch.randn(nv, generator=g).to(DEV, dtype)
    return packed[:, 3 : 3 + nv], packed[:, 3 + nv :], dt_bias, A_log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_step_with_gates_equals_gates_then_step(dtype):
    """recurrent_step_ given the raw a / b projections computes deltanet_gates' g and beta in
    its prologue: output (in the model dtype) and the states equal the two-step path."""
    from qwen35.kernels import triton_deltanet as tdn

    g = torch.Generator().manual_seed(12)
    nk, nv, dk, dv, T = 2, 4, 16, 16, 3
    C = 2 * nk * dk + nv * dv
    u = torch.randn(T, C + 5, generator=g).to(DEV, dtype)[:, :C]
    a, b, dt_bias, A_log = _gate_inputs(T, nv, dtype, g)
    rec = (torch.randn(6, nv, dk, dv, generator=g) * 0.1).to(DEV)
    slots = torch.tensor([4, 0, 2], device=DEV)
    r1, r2 = rec.clone(), rec.clone()
    gl, beta = deltanet_gates(Backend("cuda"), a, b, dt_bias, A_log)
    want = tdn.recurrent_step_(u, gl, beta, r1, slots, nk)  # fp32
    got = tdn.recurrent_step_(u, a, b, r2, slots, nk, gates=(dt_bias, A_log), out_dtype=dtype)
    assert got.dtype == dtype
    # softplus / exp in another order than torch's (a few fp32 ulps of g); bf16 interpreted:
    # beta's rounding to bf16 is up to 2 ulps off (the interpreter's cast, see ROUNDING)
    tol = dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.bfloat16 and not ON_GPU:
        tol = dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(r2, r1, **tol)
    torch.testing.assert_close(got.float(), want, **(tol if dtype == torch.float32 else
                               dict(atol=2e-2, rtol=2e-2)))  # fmt: skip
    assert not torch.equal(r2, rec) and torch.equal(r2[1], rec[1])  # only its slots moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deltanet_decode_gated_triton_equals_op_by_op(dtype):
    """The GPU path's whole decode step (conv, recurrent step with its gates, gated norm on the
    z slice in place) equals the reference ops one by one: gates, gather-path decode, norm."""
    g = torch.Generator().manual_seed(13)
    dims = Dims(nk=2, nv=4, dk=16, dv=16, kernel_size=4)
    C, Vd, T = 2 * dims.nk * dims.dk + dims.nv * dims.dv, dims.nv * dims.dv, 3
    d = DecodeBatch(
        rows=torch.arange(T, device=DEV), block_tables=torch.zeros(T, 1, dtype=torch.int32,
        device=DEV), context_lens=torch.ones(T, dtype=torch.int32, device=DEV),
        state_slots=torch.tensor([4, 1, 6], device=DEV), max_context=1, all_rows=True,
    )  # fmt: skip
    w = (torch.randn(C, 4, generator=g) * 0.5).to(DEV, dtype)
    conv = torch.randn(8, C, 3, generator=g).to(DEV, dtype)
    rec = (torch.randn(8, dims.nv, dims.dk, dims.dv, generator=g) * 0.1).to(DEV)
    norm_w = torch.randn(dims.dv, generator=g).to(DEV, dtype)
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    ref = Backend("cuda")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for _ in range(3):
        proj = torch.randn(T, C + Vd + 9, generator=g).to(DEV, dtype)  # the packed projection
        qkv, z = proj[:, :C], proj[:, C : C + Vd]
        a, b, dt_bias, A_log = _gate_inputs(T, dims.nv, dtype, g)
        got = deltanet_decode_gated(TRITON_DN, qkv, z, a, b, w, dt_bias, A_log, norm_w, 1e-6,
                                    dims, d, c1, r1)  # fmt: skip
        assert got is not None and got.shape == (T, Vd) and got.dtype == dtype
        gl, beta = deltanet_gates(ref, a, b, dt_bias, A_log)
        o = torch.empty(T, dims.nv, dims.dv, dtype=dtype, device=DEV)
        deltanet_decode(ref, qkv, gl, beta, w, dims, d, c2, r2, o)
        want = norms.gated_rms_norm(o, z.unflatten(-1, (dims.nv, dims.dv)), norm_w, 1e-6)
        torch.testing.assert_close(got, want.view(T, Vd), **tol)
        torch.testing.assert_close(c1, c2, **tol)
        torch.testing.assert_close(r1, r2, **tol)
    assert not torch.equal(r1, rec) and torch.equal(r1[0], rec[0])


def _moe_block(dtype, H=80, E=12, k=3, inter=40, shared_inter=24, seed=14, fp8=False,
               packed=True, block=(128, 128)):  # fmt: skip
    """A SparseMoE with random weights, packed as the loader leaves it (packed=False: only the
    shared expert's gate / up, the router and shared_expert_gate apart); odd sizes: H and the
    intermediate sizes are not multiples of the kernels' blocks. fp8: the routed experts and
    the shared expert's projections in e4m3 with 128 x 128 block scales (as the official FP8
    releases; router and shared_expert_gate stay in the model dtype), and a reference block
    with the dequantised weights."""
    from qwen35.layers.moe import SparseMoE

    g = torch.Generator().manual_seed(seed)
    m = SparseMoE(H, E, k, inter, shared_inter, dtype=torch.float32, device="cpu")
    for prm in m.parameters():
        prm.copy_(torch.randn(prm.shape, generator=g) * prm.shape[-1] ** -0.5)
    m = m.to(DEV, dtype)
    ref = None
    if fp8:
        import copy

        from qwen35.layers.linear import Linear
        from qwen35.layers.moe import Experts
        from qwen35.quant.layers import Fp8Experts, Fp8Linear

        m.experts = Fp8Experts.quantize(m.experts, block)
        sh = m.shared_expert
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(sh, name, Fp8Linear.quantize(getattr(sh, name).weight, block))
        ref = copy.deepcopy(m)  # the dequantised weights, plain
        ref.experts = Experts(E, H, inter, dtype, DEV)
        ref.experts.gate_up_proj.data, ref.experts.down_proj.data = m.experts.dequantized(dtype)
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(ref.shared_expert, name)
            plain = Linear(lin.in_features, lin.out_features, dtype, DEV)
            plain.weight.data = lin.dequantized(dtype)
            setattr(ref.shared_expert, name, plain)
        ref.shared_expert.pack()
    if packed:
        m.pack()  # (with FP8 shared experts: not with the router; the shared expert packs alone)
    m.shared_expert.pack()
    return m, ref, g


MOE_BE = Backend("cuda", triton_moe=True, interpret=not ON_GPU)


def _fused_calls(fn):
    """fn() with kernels/triton_moe.sparse_moe counted: (result, calls)."""
    from qwen35.kernels import triton_moe

    calls = []
    orig = triton_moe.sparse_moe
    triton_moe.sparse_moe = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    try:
        return fn(), len(calls)
    finally:
        triton_moe.sparse_moe = orig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_router_kernel_equals_route(dtype):
    """Softmax, top-k, renormalised weights in the model dtype: the same experts in the same
    (descending) order as SparseMoE.route, weights equal to rounding; E not a power of two."""
    from qwen35.kernels import triton_moe

    m, _, g = _moe_block(dtype)
    x = torch.randn(16, 80, generator=g).to(DEV, dtype)
    w_ref, i_ref = m.route(x)
    w, i = triton_moe.route(m.gate(x), m.top_k, dtype)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6 if dtype == torch.float32 else 8e-3,
                               rtol=1e-5 if dtype == torch.float32 else 8e-3)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,packed", [(1, True), (3, True), (16, True), (1, False), (3, False)])
def test_fused_moe_equals_reference(dtype, T, packed):
    """The block through the three Triton kernels (routing, gate_up + SiLU, down + weighted sum
    + the gated shared expert) against SparseMoE's reference loop; rows of x strided. packed:
    router, shared gate / up and shared_expert_gate in one matmul (SparseMoE.pack), the shared
    gate's logit read from it; else two matmuls and the logit computed in the down kernel."""
    m, _, g = _moe_block(dtype, packed=packed)
    assert (m.packed_router is not None) == packed
    x = torch.randn(T, 85, generator=g).to(DEV, dtype)[:, 5:]
    got, calls = _fused_calls(lambda: m(x, MOE_BE))
    assert calls == 1, "the fused path was not taken"
    want = m(x, None)
    # bf16: the reference rounds each expert's output, the weighting and each partial sum
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_moe_loop_not_unrolled(fp8, monkeypatch):
    """The down kernel's loop over I as a loop (UNROLL off: what 397B-A17B's shapes take) gives
    what the unrolled one gives."""
    from qwen35.kernels import triton_moe

    dtype = torch.float32
    m, _, g = _moe_block(dtype, H=200, inter=136, shared_inter=136, fp8=fp8)
    x = torch.randn(3, 200, generator=g).to(DEV, dtype)
    want = m(x, MOE_BE)
    monkeypatch.setattr(triton_moe, "UNROLL_MAX", 0)
    got, calls = _fused_calls(lambda: m(x, MOE_BE))
    assert calls == 1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("block", [(128, 128), (1, 128), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5])
def test_fused_moe_reads_fp8_experts(dtype, T, block):
    """FP8 experts and shared expert (e4m3, 128 x 128 block scales, or one scale a row and 128
    inputs: a compressed-tensors FP8-dynamic checkpoint's; H = 200 and I = 136 leave partial
    blocks) read as stored: equal to the block with the dequantised weights in the model dtype,
    to the rounding of those weights (fp32: exactly their products)."""
    m, ref, g = _moe_block(dtype, H=200, inter=136, shared_inter=136, fp8=True, block=block)
    x = torch.randn(T, 200, generator=g).to(DEV, dtype)
    got, calls = _fused_calls(lambda: m(x, MOE_BE))
    assert calls == 1, "the fused path was not taken"
    want = ref(x, None)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("block", [(128, 128), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_moe_steps_past_the_fused_kernel_run_the_sorted_grouped_gemm(dtype, block):
    """FP8 experts on a step of more tokens than the Triton MoE takes (40): quant/fp8_gpu.py
    `fp8_experts_sorted` (the pairs sorted by expert, tiles of rows, the grouped GEMM reading
    e4m3 as stored; no host sync) instead of the per-expert loop: equal to the block with the
    dequantised weights (I = 136: the up half's blocks start afresh mid-block), and a token's
    rows the same bits wherever the step holds them."""
    from qwen35.quant import fp8_gpu

    m, ref, g = _moe_block(dtype, H=200, inter=136, shared_inter=136, fp8=True, block=block)
    T = 40
    x = torch.randn(T, 200, generator=g).to(DEV, dtype)
    calls = []
    real = fp8_gpu.fp8_experts_sorted
    fp8_gpu.fp8_experts_sorted = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    try:
        got = m(x, MOE_BE)
        perm = torch.randperm(T, generator=torch.Generator().manual_seed(2)).to(DEV)
        got2 = m(x[perm], MOE_BE)
    finally:
        fp8_gpu.fp8_experts_sorted = real
    assert calls == [T, T], calls
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, ref(x, None), **tol)
    if ON_GPU or dtype == torch.bfloat16:
        assert torch.equal(got2, got[perm])
    else:  # (interpreted fp32 dots are numpy's BLAS: a row's last bit depends on its place)
        torch.testing.assert_close(got2, got[perm], atol=1e-6, rtol=0)
    assert m.experts.few_token_graphs(MOE_BE) > 1000  # capturable at any batch


def test_fused_moe_declines_what_it_does_not_cover():
    """More tokens than FUSED_MAX_TOKENS, no Triton MoE in the backend, weights of another dtype,
    int8 experts: None (the caller takes the grouped / looped path)."""
    from qwen35.layers.linear import packed_linear
    from qwen35.ops.moe import FUSED_MAX_TOKENS, fused_moe

    m, _, g = _moe_block(torch.float32)
    sh = m.shared_expert
    shared = (m.shared_expert_gate.weight,
              lambda x: packed_linear(x, sh.packed_gate_up, sh.gate_proj, sh.up_proj),
              sh.down_proj.weight, None)  # fmt: skip
    args = (m.gate.weight, m.top_k, m.experts.fused_weights(), shared)
    x = torch.randn(FUSED_MAX_TOKENS + 1, 80, generator=g).to(DEV)
    assert fused_moe(MOE_BE, x, *args) is None
    assert fused_moe(Backend("cuda", interpret=not ON_GPU), x[:2], *args) is None
    assert fused_moe(MOE_BE, x[:2].double(), *args) is None
    assert fused_moe(MOE_BE, x[:2], m.gate.weight, m.top_k, None, shared) is None
    assert fused_moe(MOE_BE, x[:2], *args) is not None


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
def test_qk_norm_rotary_cache_equals_op_by_op(dtype):
    """q_norm + rotary to a new q, k_norm + rotary and v into their cache slots, one launch,
    against the Triton norm and rotary kernels plus write_kv (which it must equal bit for bit:
    the same arithmetic) and against the PyTorch references (to rounding); partial rotary (8 of
    32 dims) and full (64 of 64); q, k, v column slices of one packed projection."""
    from qwen35.kernels import triton_pointwise as tp
    from qwen35.layers.rotary import RotaryEmbedding, apply_rotary
    from qwen35.ops.attention import write_kv

    g = torch.Generator().manual_seed(4)
    for hd, rd in ((32, 8), (64, 64)):
        T, nh, nkv, bs = 5, 4, 2, 4
        pos = torch.tensor([0, 3, 9, 300, 17]).to(DEV)
        cos, sin = RotaryEmbedding(rd, 1e7).cos_sin(pos, dtype)
        proj = (torch.randn(T, 2 * nh * hd + 2 * nkv * hd + 3, generator=g) * 2).to(DEV, dtype)
        qg = proj[:, : 2 * nh * hd]
        k = proj[:, 2 * nh * hd : 2 * nh * hd + nkv * hd]
        v = proj[:, 2 * nh * hd + nkv * hd : -3]
        qw, kw = (torch.randn(hd, generator=g) * 0.3).to(DEV, dtype), (torch.randn(hd,
                  generator=g) * 0.3).to(DEV, dtype)  # fmt: skip
        slots = torch.tensor([13, 2, 7, 0, 21]).to(DEV)
        kc, vc = (torch.randn(6, bs, nkv, hd, generator=g).to(DEV, dtype) for _ in range(2))
        kc2, vc2, kc3, vc3 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        q = tp.qk_norm_rotary_cache(qg, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slots)
        # the Triton kernels one by one
        q1 = tn.rms_norm_zc(qg.unflatten(-1, (nh, 2 * hd))[..., :hd], qw, 1e-6)
        k1 = tn.rms_norm_zc(k.unflatten(-1, (nkv, hd)), kw, 1e-6)
        tp.rotary_qk_(q1, k1, cos, sin)
        write_kv(kc2, vc2, k1, v.unflatten(-1, (nkv, hd)), slots)
        exact = dict(atol=0, rtol=0) if ON_GPU else ROUNDING[dtype]
        torch.testing.assert_close(q, q1, **exact)
        torch.testing.assert_close(kc, kc2, **exact)
        assert torch.equal(vc, vc2)
        # the PyTorch references
        q2 = apply_rotary(norms.rms_norm_zc(qg.unflatten(-1, (nh, 2 * hd))[..., :hd], qw, 1e-6),
                          cos, sin)  # fmt: skip
        k2 = apply_rotary(norms.rms_norm_zc(k.unflatten(-1, (nkv, hd)), kw, 1e-6), cos, sin)
        write_kv(kc3, vc3, k2, v.unflatten(-1, (nkv, hd)), slots)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(q, q2, **tol)
        torch.testing.assert_close(kc, kc3, **tol)
        untouched = torch.ones(6 * bs, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert torch.equal(kc.view(-1, nkv, hd)[untouched.to(DEV)],
                           kc2.view(-1, nkv, hd)[untouched.to(DEV)])  # fmt: skip


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


@pytest.mark.parametrize("block", [(128, 128), (1, 128), (1, 32)])
@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (7, 384, 1024), (130, 200, 333)])
def test_block_fp8_kernel_matches_dequantised_reference(M, N, K, block):
    """quant/fp8_gpu.py's Triton kernel (the path where torch's blockwise _scaled_mm is missing):
    partial last blocks in N and K, 1..130 rows; blocks of 128 x 128 (the official releases) and
    of one row (a compressed-tensors FP8-dynamic checkpoint's scale per channel). Its only error
    is the per-token-group e4m3 quantization of the activations (~2^-5 relative, averaged over
    K)."""
    from qwen35.quant import fp8_gpu
    from qwen35.quant.formats import dequantize_fp8_blocks, quantize_fp8_blocks

    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w, s = quantize_fp8_blocks(torch.randn(N, K, generator=g) * 0.05, block)
    x, w, s = x.to(DEV), w.to(DEV), s.float().to(DEV)
    y = fp8_gpu._triton_kernel()(x, w, s, block)
    want = fp8_gpu.reference(x, w, s, block)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert _rel(y, want) < 0.03
    # that error is all: against the same quantized activations the kernel is exact up to fp32
    # summation order (fp32 output: no final rounding; the interpreter's bf16 cast truncates).
    # On Hopper, tiles of 64+ rows take wgmma, whose e4m3 products accumulate with ~14 mantissa
    # bits inside each 128-wide K block (DeepSeek-V3 report, 3.3.2; the kernel adds each block
    # into fp32 after its scales): 1.2e-4 seen on an H200 at 130 rows, under 1e-5 at 1 and 7
    exact = 5e-4 if ON_GPU and M >= 64 else 1e-5
    x32 = x.float()
    xq, xs = fp8_gpu.quantize_activations(x32)
    if block[1] != 128:  # (the activations are quantized per group of the blocks' width)
        xq, xs = fp8_gpu.quantize_activations(x32, block[1])
    x_deq = xq.float() * xs.repeat_interleave(block[1], 1)[:, :K]
    w_deq = dequantize_fp8_blocks(w, s, torch.float32, block)
    assert _rel(fp8_gpu._triton_kernel()(x32, w, s, block), x_deq @ w_deq.T) < exact


@pytest.mark.parametrize("block", [(128, 128), (1, 128), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (5, 200, 333), (16, 384, 1024)])
def test_fp8_gemv_kernel_equals_dequantised_weights(dtype, M, N, K, block):
    """quant/fp8_gpu.py's decode path (up to 16 rows, weights read as stored, activations not
    quantized): the dequantised-weight reference up to summation order (fp32) / the output's
    rounding (bf16); partial last blocks in N and K; 128 x 128 blocks and one-row ones."""
    from qwen35.quant import fp8_gpu
    from qwen35.quant.formats import dequantize_fp8_blocks, quantize_fp8_blocks

    g = torch.Generator().manual_seed(M + N)
    x = torch.randn(M, K + 3, generator=g).to(DEV, dtype)[:, :K]  # rows strided
    w, s = quantize_fp8_blocks(torch.randn(N, K, generator=g) * 0.05, block)
    w, s = w.to(DEV), s.float().to(DEV)
    y = fp8_gpu._gemv_kernel()(x, w, s, block)
    assert y.shape == (M, N) and y.dtype == dtype
    want = x.float() @ dequantize_fp8_blocks(w, s, torch.float32, block).T
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), want, **tol)


@triton.jit
def _e4m3_convert_kernel(B, O, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(O + i, e4m3_to_fp16(tl.load(B + i)).to(tl.float32) * UNSCALE)


def test_e4m3_bytes_convert_exactly():
    """kernels/triton_fp8.py: every e4m3fn byte, moved into fp16 bits and scaled by UNSCALE,
    is torch's value of that byte exactly (subnormals and -0 included); the two NaN bytes
    read as +-480 (the checkpoints hold none)."""
    w = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(DEV)
    out = torch.empty(256, device=DEV)
    _e4m3_convert_kernel[(1,)](bits(w), out, N=256)
    want = w.float()
    nan = want.isnan()
    assert torch.equal(out[~nan], want[~nan])
    assert torch.signbit(out[~nan]).tolist() == torch.signbit(want[~nan]).tolist()
    assert out[nan].tolist() == [480.0, -480.0]


# weight-only int4 / int6 / int8 on the GPU (kernels/triton_int.py): the CPU formats' bytes
INT_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,group", [(1, 128, 256, 32), (5, 192, 384, 128), (16, 4096, 128, 64)])
def test_int4_gemv_and_dequant_equal_dequantised_weights(dtype, M, N, K, group):
    """Int4Linear's layout read on the GPU: decode rows (the dequantised-weight product up to fp32
    summation order / the output's rounding; K split over programs where rows are few, and not:
    4096 rows) and the dequantisation prefill's GEMM runs on (formats.dequantize_int4_groups's
    values: bitwise on a GPU up to an FMA, one bf16 ulp interpreted)."""
    from qwen35.kernels import triton_int as ti
    from qwen35.quant import formats, matmul

    g = torch.Generator().manual_seed(M + N)
    q, sz = formats.quantize_int4_groups(torch.randn(N, K, generator=g) * 0.05, group, dtype)
    packed, sz = matmul.pack_int4(q).to(DEV), sz.to(DEV)
    x = torch.randn(M, K + 3, generator=g).to(DEV, dtype)[:, :K]  # rows strided
    w = formats.dequantize_int4_groups(q.to(DEV), sz, group, torch.float32)
    y = ti.int4_gemv(x, packed, sz, group, N)
    assert y.shape == (M, N) and y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float() @ w.T, **INT_TOL[dtype])
    out = torch.empty(N, K, dtype=dtype, device=DEV)
    ti.int4_dequant(packed, sz, group, out)
    torch.testing.assert_close(out, w.to(dtype), **ROUNDING[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 200, 256), (7, 64, 1024), (16, 333, 64)])
def test_int6_and_int8_gemvs_equal_dequantised_weights(dtype, M, N, K):
    """The int4 models' lm_head (int6 groups of 32, formats.quantize_int6_groups) and per-row
    int8 on the GPU: the dequantised-weight product (activations not rounded), partial row
    blocks, K split or not."""
    from qwen35.kernels import triton_int as ti
    from qwen35.quant import formats

    g = torch.Generator().manual_seed(M + K)
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    packed, scales = (t.to(DEV) for t in formats.quantize_int6_groups(w))
    y = ti.int6_gemv(x, packed, scales)
    want = x.float() @ formats.dequantize_int6(packed, scales).T
    assert y.shape == (M, N) and y.dtype == dtype
    torch.testing.assert_close(y.float(), want, **INT_TOL[dtype])
    q, s = (t.to(DEV) for t in formats.quantize_int8_rows(w[:, : K - 5], dtype))  # odd K
    y = ti.int8_gemv(x[:, : K - 5].contiguous(), q, s)
    want = x[:, : K - 5].float() @ formats.dequantize_int8_rows(q, s, torch.float32).T
    torch.testing.assert_close(y.float(), want, **INT_TOL[dtype])


def _int_experts_step(seed, T, k, dtype, groups, down):
    """Stacked IntExperts (6 experts, H 128, I 64: gate_up int4 in groups[0], down int4 in
    groups[1] or per-row int8) and a step's x [T, H], picks [T, k] and routing weights."""
    from qwen35.quant.layers import Int4Linear, Int8Linear, IntExperts

    g = torch.Generator().manual_seed(seed)
    E, H, I = 6, 128, 64
    gu = [Int4Linear.quantize(torch.randn(2 * I, H, generator=g) * 0.05, groups[0], dtype)
          for _ in range(E)]  # fmt: skip
    dn = [Int4Linear.quantize(torch.randn(H, I, generator=g) * 0.05, groups[1], dtype)
          if down == "int4" else Int8Linear.quantize(torch.randn(H, I, generator=g) * 0.05, dtype)
          for _ in range(E)]  # fmt: skip
    ex = IntExperts(gu, dn, I).to(DEV)
    assert ex.stack_() and ex.stack[1].kind == down
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEV)
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(DEV, dtype)
    return ex, x, idx, w


@pytest.mark.parametrize("T", [5, 16])
@pytest.mark.parametrize("down", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_moe_kernels_equal_expert_loop(dtype, down, T):
    """quant/int_gpu.py `int_experts_gpu` (IntExperts' stacked weights, one kernel per
    projection over the (token, expert) pairs) against the expert loop on the per-expert
    modules' dequantised weights (those modules now views of the stack), in fp32: gate_up int4
    in groups of 32, down int4 in groups of 64 or per-row int8 (a GGUF Q4_K_M's Q6_K down
    experts), rows picking the same experts."""
    from qwen35.ops.moe import grouped_experts_reference
    from qwen35.quant.int_gpu import int_experts_gpu

    ex, x, idx, w = _int_experts_step(3, T, 3, dtype, (32, 64), down)
    y = int_experts_gpu(x, idx, w, ex.stack)
    assert y is not None  # (up to MOE_MAX_ROWS tokens: a decode batch of 16 too)
    # a token's sums are split over programs as for the token alone: batched == alone, bitwise
    assert torch.equal(int_experts_gpu(x[1:2], idx[1:2], w[1:2], ex.stack), y[1:2])
    gu32 = torch.stack([m.dequantized(torch.float32) for m in ex.gate_up_q])
    dn32 = torch.stack([m.dequantized(torch.float32) for m in ex.down_q])
    ref = grouped_experts_reference(x.float(), gu32, dn32, idx, w.float())
    torch.testing.assert_close(y.float(), ref, **INT_TOL[dtype])


@pytest.mark.parametrize("M", [40, 70, 300])
def test_int_gpu_products_past_16_rows(M):
    """quant/int_gpu.py past one GEMV call: up to 64 rows the GEMVs 16 rows a call (int4 / int8),
    then the GEMM kernel, past DENSE_GEMM_MAX_ROWS int4 dequantised + a GEMM (int8: None, its
    caller dequantises); the int6 head 16 rows a call at any count. fp32: the
    dequantised-weight products up to summation order."""
    from qwen35.quant import formats, int_gpu, matmul

    g = torch.Generator().manual_seed(M)
    N, K, group = 128, 256, 64
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(M, K, generator=g).to(DEV)
    q, sz = formats.quantize_int4_groups(w, group, torch.float32)
    want = x @ formats.dequantize_int4_groups(q, sz, group, torch.float32).to(DEV).T
    y = int_gpu.int4_linear_gpu(x, matmul.pack_int4(q).to(DEV), sz.to(DEV), group, N)
    torch.testing.assert_close(y, want, **INT_TOL[torch.float32])
    packed, scales = (t.to(DEV) for t in formats.quantize_int6_groups(w))
    y = int_gpu.int6_linear_gpu(x, packed, scales)
    torch.testing.assert_close(y, x @ formats.dequantize_int6(packed, scales).T,
                               **INT_TOL[torch.float32])  # fmt: skip
    q8, s8 = (t.to(DEV) for t in formats.quantize_int8_rows(w, torch.float32))
    y = int_gpu.int8_linear_gpu(x, q8, s8)
    assert (y is None) == (M > int_gpu.DENSE_GEMM_MAX_ROWS)
    if y is not None:
        want = x @ formats.dequantize_int8_rows(q8, s8, torch.float32).T
        torch.testing.assert_close(y, want, **INT_TOL[torch.float32])


@pytest.mark.parametrize("T,k", [(100, 2), (23, 5)])
@pytest.mark.parametrize("down", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_moe_sorted_grouped_gemm_equals_expert_loop(dtype, down, T, k):
    """A prefill-sized MoE step on stacked int experts (quant/int_gpu.py int_experts_sorted:
    the pairs sorted by expert, tiles of rows per expert, the grouped int4 / int8 GEMM reading
    the codes): the expert loop on the same dequantised weights (fp32: up to summation order);
    an expert with no rows, partial tiles (6 experts: 200 / 115 pairs); a token's rows give the
    same bits wherever the step holds them (tiles sized by the step's shape only)."""
    from qwen35.kernels.triton_tiles import gemm_bm
    from qwen35.ops.moe import grouped_experts_reference
    from qwen35.quant.int_gpu import MOE_MAX_ROWS, int_experts_gpu, int_experts_sorted

    ex, x, _, w = _int_experts_step(5, T, k, dtype, (64, 32), down)
    g = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(T)]).to(DEV)  # no 5
    assert T <= MOE_MAX_ROWS or int_experts_gpu(x, idx, w, ex.stack) is None
    y = int_experts_sorted(x, idx, w, ex.stack)
    gu32 = torch.stack([m.dequantized(torch.float32) for m in ex.gate_up_q])
    dn32 = torch.stack([m.dequantized(torch.float32) for m in ex.down_q])
    ref = grouped_experts_reference(x.float(), gu32, dn32, idx, w.float())
    torch.testing.assert_close(y.float(), ref, **INT_TOL[dtype])
    assert gemm_bm(T * k / 6) == (32 if T == 100 else 16)  # 33 / 19 rows an expert
    # a token moved to another place in the step, with other tokens: its rows' bits unchanged
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1)).to(DEV)
    y2 = int_experts_sorted(x[perm], idx[perm], w[perm], ex.stack)
    if ON_GPU or dtype == torch.bfloat16:
        assert torch.equal(y2, y[perm])
    else:  # (interpreted fp32 dots are numpy's BLAS: a row's last bit depends on its place)
        torch.testing.assert_close(y2, y[perm], atol=2e-7, rtol=0)


def test_tile_rows_cover_each_expert_once():
    """triton_tiles.tile_rows: every row of every expert in exactly one tile of its expert, no
    tile past the expert's rows, the unused tiles empty (expert -1), sized by the row count
    alone (capturable: no host sync to size it)."""
    from qwen35.kernels import triton_tiles as ti

    g = torch.Generator().manual_seed(0)
    for E, rows, bm in [(6, 200, 32), (256, 40, 16), (4, 1, 64), (3, 128, 64), (5, 0, 16)]:
        picks = torch.randint(0, E, (rows,), generator=g)
        picks[: rows // 3] = 0  # (one crowded expert)
        counts = torch.bincount(picks, minlength=E).int()
        tiles = ti.tile_rows(counts.to(DEV), bm, rows).cpu()
        assert tiles.shape == (-(-rows // bm) + min(E, rows), 3)
        ends = counts.cumsum(0)
        seen = torch.zeros(rows, dtype=torch.int32)
        for e, r0, end in tiles.tolist():
            if e < 0:
                assert end == 0
                continue
            assert end == ends[e] and ends[e] - counts[e] <= r0 < end
            seen[r0 : min(r0 + bm, end)] += 1
        assert bool((seen == 1).all())


@pytest.mark.parametrize("M", [65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_gemm_dense_rows_equal_dequantised_weights(dtype, M):
    """quant/int_gpu.py past the GEMVs (64 rows) and up to DENSE_GEMM_MAX_ROWS: the int4 / int8
    GEMM (tiles of rows against each weight block, the codes read as stored; 65 rows: a
    partial tile) = the dequantised-weight product; rows strided in x."""
    from qwen35.kernels import triton_int as ti
    from qwen35.quant import formats, int_gpu, matmul

    assert int_gpu.GEMV_MAX_ROWS < M <= int_gpu.DENSE_GEMM_MAX_ROWS
    g = torch.Generator().manual_seed(M)
    N, K, group = 192, 256, 32
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(M, K + 8, generator=g).to(DEV, dtype)[:, :K]
    q, sz = formats.quantize_int4_groups(w, group, dtype)
    want = x.float() @ formats.dequantize_int4_groups(q, sz, group, torch.float32).to(DEV).T
    calls = []
    real = ti.int_gemm
    ti.int_gemm = lambda *a: calls.append(a[2]) or real(*a)
    try:
        y = int_gpu.int4_linear_gpu(x, matmul.pack_int4(q).to(DEV), sz.to(DEV), group, N)
        q8, s8 = (t.to(DEV) for t in formats.quantize_int8_rows(w[:, :-3], dtype))
        y8 = int_gpu.int8_linear_gpu(x[:, :-3], q8, s8)  # (K not a multiple of the tile)
    finally:
        ti.int_gemm = real
    assert calls == [M, M] and y.dtype == dtype
    torch.testing.assert_close(y.float(), want, **INT_TOL[dtype])
    want8 = x[:, :-3].float() @ formats.dequantize_int8_rows(q8, s8, torch.float32).T
    torch.testing.assert_close(y8.float(), want8, **INT_TOL[dtype])
