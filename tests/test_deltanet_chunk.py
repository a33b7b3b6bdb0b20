"""The chunked gated delta rule in C++ (kernels/gated_delta_cpu.cpp `deltanet_chunk`, the CPU
prefill of every DeltaNet layer) against the per-token recurrence and its PyTorch twin
(ops/gated_delta.py chunk_gated_delta_rule)."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import native_or_skip
from qwen35 import kernels
from qwen35.ops import deltanet as deltanet_ops
from qwen35.ops.gated_delta import chunk_gated_delta_rule, naive_gated_delta_rule


@pytest.fixture(scope="module")
def mod():
    return native_or_skip(kernels.DELTANET, "the DeltaNet kernel")


def _inputs(T, Hk=2, Hv=4, dk=16, dv=32, dtype=torch.float32, seed=0, decay=2.0):
    """q, k, v as strided views of one conv output row (as the layer splits it), g <= 0, beta,
    an initial state."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * Hk * dk + Hv * dv
    u = torch.randn(T, width + 16, generator=g).to(dtype)[:, :width]
    q = u[:, : Hk * dk].unflatten(-1, (Hk, dk))
    k = u[:, Hk * dk : 2 * Hk * dk].unflatten(-1, (Hk, dk))
    v = u[:, 2 * Hk * dk :].unflatten(-1, (Hv, dv))
    log_decay = -torch.rand(T, Hv, generator=g) * decay
    beta = torch.rand(T, Hv, generator=g)
    s0 = torch.randn(Hv, dk, dv, generator=g) * 0.3
    return q, k, v, log_decay, beta, s0


def _run(mod, q, k, v, g, beta, s0, ck=(), avx2_only=False):
    T, Hv, dv = v.shape
    dk = k.shape[2]
    state = torch.zeros(Hv, dk, dv) if s0 is None else s0.clone()
    o = torch.empty(T, Hv, dv, dtype=v.dtype)
    states = torch.empty(len(ck), Hv, dk, dv)
    mod.deltanet_chunk(q, k, v, g.contiguous(), beta.float().contiguous(), state, o, list(ck),
                       states, dk**-0.5, avx2_only)  # fmt: skip
    return o, state, states


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 150, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_equals_the_per_token_recurrence(mod, T, with_state):
    """Chunks whole and partial (the last zero-padded), GQA (two value heads a key head)."""
    q, k, v, g, beta, s0 = _inputs(T, seed=T)
    init = s0 if with_state else None
    o, S, _ = _run(mod, q, k, v, g, beta, init)
    o_ref, S_ref = naive_gated_delta_rule(
        *(x[None] for x in (q, k, v, g, beta)), None if init is None else init[None],
        use_qk_l2norm=True,
    )  # fmt: skip
    torch.testing.assert_close(o, o_ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(S, S_ref[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dims", [(16, 16), (32, 48), (128, 128), (64, 16)])
def test_head_dims_and_dtypes_against_the_pytorch_twin(mod, dims):
    """Head dims multiples of 16 (the real models': 128), fp32 / bf16 / fp16 rows: the output in
    the rows' dtype, the state fp32, as the twin's `out=` gives them."""
    dk, dv = dims
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        q, k, v, g, beta, s0 = _inputs(130, Hk=1, Hv=3, dk=dk, dv=dv, dtype=dtype, seed=dk + dv)
        o, S, _ = _run(mod, q, k, v, g, beta.to(dtype), s0)
        ref_o = torch.empty_like(o)
        _, ref_S = chunk_gated_delta_rule(
            q[None], k[None], v[None], g[None], beta.to(dtype)[None], s0[None],
            use_qk_l2norm=True, out=ref_o[None],
        )  # fmt: skip
        assert o.dtype == dtype and S.dtype == torch.float32
        torch.testing.assert_close(o.float(), ref_o.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(S, ref_S[0], atol=2e-5, rtol=2e-5)


def test_avx2_path_and_one_thread_equal_the_avx512_path_bit_for_bit(mod):
    """Every output sums its terms in the same order in 8 and 16 lanes (on a CPU without
    AVX-512 both calls take the AVX2 path, and the check holds trivially), and a head's
    arithmetic does not depend on which thread takes it."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, g, beta, s0 = _inputs(200, Hk=2, Hv=4, dk=128, dv=128, dtype=dtype, seed=9)
        wide = _run(mod, q, k, v, g, beta, s0, ck=(64, 192))
        narrow = _run(mod, q, k, v, g, beta, s0, ck=(64, 192), avx2_only=True)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            alone = _run(mod, q, k, v, g, beta, s0, ck=(64, 192))
        finally:
            torch.set_num_threads(threads)
        for a, b, c in zip(wide, narrow, alone, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_checkpoints_and_a_prompt_cut_on_the_chunk_grid_are_bitwise(mod):
    """The state after 64 / 128 tokens comes out of the hand-off between chunks: the same bits
    as a run that stops there; a prompt cut at a multiple of 64 (chunked prefill, a prefix hit)
    continues from that state to the whole run's outputs and final state, bit for bit."""
    q, k, v, g, beta, s0 = _inputs(200, seed=4)
    o, S, states = _run(mod, q, k, v, g, beta, s0, ck=(64, 128))
    for i, t in enumerate((64, 128)):
        _, St, _ = _run(mod, *(x[:t] for x in (q, k, v, g, beta)), s0)
        assert torch.equal(states[i], St)
    o1, S1, _ = _run(mod, *(x[:128] for x in (q, k, v, g, beta)), s0)
    o2, S2, _ = _run(mod, *(x[128:] for x in (q, k, v, g, beta)), S1)
    assert torch.equal(torch.cat([o1, o2]), o) and torch.equal(S2, S)


def test_short_prompts_take_narrower_chunks_with_the_same_bits(mod):
    """A prompt under 64 tokens runs one chunk of its length rounded up to 16 (less work); the
    padding adds exact zeros, so its outputs are those of the same tokens at the head of a longer
    prompt (a 64-row chunk, where later rows never reach earlier ones)."""
    q, k, v, g, beta, s0 = _inputs(70, seed=6)
    o, _, _ = _run(mod, q, k, v, g, beta, s0)
    for T in (1, 5, 16, 17, 33, 48, 63):
        o_short, _, _ = _run(mod, *(x[:T] for x in (q, k, v, g, beta)), s0)
        assert torch.equal(o_short, o[:T]), T


def test_strong_decay_stays_finite_and_exact(mod):
    """Decays that underflow fp32 within a chunk (the twin cuts exponents under -60 to 0, so do
    we): no NaN, no denormal blow-up, the recurrence's result."""
    q, k, v, g, beta, s0 = _inputs(150, seed=2, decay=80.0)
    o, S, _ = _run(mod, q, k, v, g, beta, s0)
    o_ref, S_ref = naive_gated_delta_rule(
        *(x[None] for x in (q, k, v, g, beta)), s0[None], use_qk_l2norm=True
    )
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(S, S_ref[0], atol=2e-5, rtol=2e-5)


def test_refusals_say_what_was_wrong(mod):
    q, k, v, g, beta, s0 = _inputs(70)
    with pytest.raises(RuntimeError, match="multiples of 64"):
        _run(mod, q, k, v, g, beta, s0, ck=(50,))
    with pytest.raises(RuntimeError, match="multiples of 64"):
        _run(mod, q, k, v, g, beta, s0, ck=(128,))  # past T
    q2, k2, v2, g2, b2, s2 = _inputs(10, dk=8, dv=16)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        _run(mod, q2, k2, v2, g2, b2, s2)
    with pytest.raises(RuntimeError, match="fp32"):
        _run(mod, q, k, v, g.double(), beta, s0)


def test_layer_prefill_takes_it_where_it_applies(mod, monkeypatch):
    """ops/deltanet.py chunk_kernel: the kernels' module on CPU backends for head dims of 16s;
    None for the reference backend, other head dims, or kernels switched off."""
    from qwen35.ops.backend import reference_backend, select_backend

    be = select_backend("cpu")
    qkv = torch.randn(3, 96)
    dims = deltanet_ops.Dims(nk=1, nv=2, dk=16, dv=32, kernel_size=4)
    assert deltanet_ops.chunk_kernel(be, qkv, dims) is not None
    assert deltanet_ops.chunk_kernel(reference_backend("cpu"), qkv, dims) is None
    odd = deltanet_ops.Dims(nk=1, nv=2, dk=8, dv=32, kernel_size=4)
    assert deltanet_ops.chunk_kernel(be, qkv, odd) is None
    assert deltanet_ops.chunk_kernel(be, qkv.double(), dims) is None


def test_random_shapes_against_the_twin(mod):
    """Random lengths (1-400), GQA groups, head dims (multiples of 16), dtypes, decays, initial
    states and checkpoints: the twin's outputs, states and checkpoint states within a rounding,
    and each prompt cut at a random checkpoint continuing to the same bits."""
    rng = torch.Generator().manual_seed(11)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    for case in range(24):
        T = int(torch.randint(1, 401, (1,), generator=rng))
        Hk, r = pick([1, 2, 3]), pick([1, 2, 4])
        dk, dv = pick([16, 32, 64]), pick([16, 48, 64])
        dtype = pick([torch.float32, torch.bfloat16])
        q, k, v, g, beta, s0 = _inputs(T, Hk=Hk, Hv=Hk * r, dk=dk, dv=dv, dtype=dtype, seed=case,
                                       decay=pick([0.1, 2.0, 30.0]))  # fmt: skip
        init = s0 if pick([True, False]) else None
        grid = list(range(64, T + 1, 64))
        ck = [t for t in grid if pick([True, False])]
        o, S, states = _run(mod, q, k, v, g, beta, init, ck=ck)
        ref_o = torch.empty_like(o)
        dests = torch.empty(len(ck), Hk * r, dk, dv)
        _, ref_S = chunk_gated_delta_rule(
            q[None], k[None], v[None], g[None], beta[None], None if init is None else init[None],
            use_qk_l2norm=True, out=ref_o[None],
            states_at=[(t, dests[i][None]) for i, t in enumerate(ck)],
        )  # fmt: skip
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(o.float(), ref_o.float(), atol=tol, rtol=tol, msg=f"case {case}")
        torch.testing.assert_close(S, ref_S[0], atol=5e-5, rtol=5e-5, msg=f"case {case}")
        torch.testing.assert_close(states, dests, atol=5e-5, rtol=5e-5, msg=f"case {case}")
        if ck:
            t, i = ck[0], 0
            o2, S2, _ = _run(mod, *(x[t:] for x in (q, k, v, g, beta)), states[i].clone())
            assert torch.equal(o2, o[t:]) and torch.equal(S2, S), case
