"""The fast ops against their plain references: gated delta rule, causal conv, paged attention."""

from __future__ import annotations

import pytest
import torch

from qwen35.ops.attention import (
    decode_attention,
    gather_kv,
    naive_attention,
    prefill_attention,
    write_kv,
)
from qwen35.ops.conv import (
    causal_conv1d,
    causal_conv1d_update_,
    conv_state_at,
    naive_causal_conv1d,
)
from qwen35.ops.gated_delta import (
    chunk_gated_delta_rule,
    naive_gated_delta_rule,
    recurrent_gated_delta_step,
    unit_lower_inverse,
)


def _delta_inputs(B, T, Hk=2, Hv=4, dk=16, dv=24, seed=0):
    """Raw q, k (normalised in the kernels), value heads = 2x key heads (GQA-like)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, dk, generator=g)
    k = torch.randn(B, T, Hk, dk, generator=g)
    v = torch.randn(B, T, Hv, dv, generator=g)
    logdecay = -torch.rand(B, T, Hv, generator=g) * 0.5  # g <= 0
    beta = torch.rand(B, T, Hv, generator=g)
    s0 = torch.randn(B, Hv, dk, dv, generator=g)
    return q, k, v, logdecay, beta, s0


TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 150])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive(T, with_state):
    q, k, v, g, beta, s0 = _delta_inputs(2, T, seed=T)
    init = s0 if with_state else None
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, init, use_qk_l2norm=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, init, use_qk_l2norm=True)
    assert o.shape == o_ref.shape == (2, T, 4, 24) and s.shape == s_ref.shape == (2, 4, 16, 24)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


def test_chunked_options_chunk_sizes_strong_decay_and_out():
    """Chunk size is not part of the math; strong decay exercises exp underflow; `out` takes
    the result in its dtype; without l2norm, q is only scaled."""
    q, k, v, g, beta, s0 = _delta_inputs(1, 50, seed=3)
    g = g * 40
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True)
    for c in (8, 16, 64):
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True, chunk_size=c)
        torch.testing.assert_close(o, o_ref, **TOL)
        torch.testing.assert_close(s, s_ref, **TOL)
    out = torch.empty(1, 50, 4, 24, dtype=torch.bfloat16)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True, out=out)
    assert o is out
    torch.testing.assert_close(out, o_ref.to(torch.bfloat16))
    q, k = q / 4, k / 4  # no l2norm: small inputs keep the recurrence tame
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0, scale=0.3)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, scale=0.3)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


def test_recurrent_steps_equal_naive():
    q, k, v, g, beta, s0 = _delta_inputs(3, 5, seed=7)
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0, use_qk_l2norm=True)
    S = s0.clone()
    for t in range(5):
        o_t = recurrent_gated_delta_step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, use_qk_l2norm=True
        )
        torch.testing.assert_close(o_t, o_ref[:, t], **TOL)
    torch.testing.assert_close(S, s_ref, **TOL)


def test_chunked_split_equals_whole():
    """Running a prefix then the rest from its state equals one pass (prefix caching)."""
    q, k, v, g, beta, _ = _delta_inputs(1, 100, seed=11)
    o_all, s_all = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    o1, s1 = chunk_gated_delta_rule(*(x[:, :37] for x in (q, k, v, g, beta)), use_qk_l2norm=True)
    o2, s2 = chunk_gated_delta_rule(
        *(x[:, 37:] for x in (q, k, v, g, beta)), s1, use_qk_l2norm=True
    )
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, **TOL)
    torch.testing.assert_close(s2, s_all, **TOL)


def test_chunked_states_at_equal_prefix_states():
    """states_at copies the state after t tokens (t on the chunk grid) = a prefix run's state;
    offsets off the grid are refused."""
    q, k, v, g, beta, s0 = _delta_inputs(2, 150, seed=5)
    dest = {t: torch.empty(2, 4, 16, 24) for t in (16, 64, 144)}
    o, s = chunk_gated_delta_rule(
        q, k, v, g, beta, s0, use_qk_l2norm=True, chunk_size=16, states_at=list(dest.items())
    )
    for t, d in dest.items():
        _, ref = naive_gated_delta_rule(
            *(x[:, :t] for x in (q, k, v, g, beta)), s0, use_qk_l2norm=True
        )
        torch.testing.assert_close(d, ref, **TOL)
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        chunk_gated_delta_rule(q, k, v, g, beta, states_at=[(40, dest[16])], chunk_size=16)


def test_prefill_segments_cut_only_off_grid():
    from qwen35.ops.deltanet import segments as _segments

    # grid checkpoints stay inside one call; 100 (off the grid) cuts, and the grid restarts there
    cps = [(64, 7), (100, 8), (164, 9), (200, 10)]
    assert _segments(cps, 256, 64) == [(0, 100, [(64, 7)]), (100, 200, [(164, 9)]), (200, 256, [])]
    assert _segments([], 50, 64) == [(0, 50, [])]
    assert _segments([(50, 3)], 50, 64) == [(0, 50, [])]  # at the end: the final state
    # chunk 0 (fla: final states only): every checkpoint before the end cuts
    assert _segments(cps, 256, 0) == [(0, 64, []), (64, 100, []), (100, 164, []),
                                      (164, 200, []), (200, 256, [])]  # fmt: skip


@pytest.mark.parametrize("C", [64, 8, 5])
def test_unit_lower_inverse(C):
    a = torch.randn(3, 2, C, C, dtype=torch.float64) * 0.3
    eye = torch.eye(C, dtype=torch.float64)
    ref = torch.linalg.inv(eye + a.tril(-1))
    torch.testing.assert_close(unit_lower_inverse(a), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 20])
def test_conv_prefill_matches_reference_and_carries_state(dtype, T):
    g = torch.Generator().manual_seed(T)
    C, K = 12, 4
    x = torch.randn(T, C, generator=g).to(dtype)
    w = torch.randn(C, K, generator=g).to(dtype)
    state = torch.randn(C, K - 1, generator=g).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for s in (None, state):
        torch.testing.assert_close(causal_conv1d(x, w, s), naive_causal_conv1d(x, w, s), **tol)
    # split after n tokens: the rest from the state after n equals the whole
    for n in range(1, T):
        s_n = conv_state_at(x, state, n, K)
        y = torch.cat([causal_conv1d(x[:n], w, state), causal_conv1d(x[n:], w, s_n)])
        torch.testing.assert_close(y, causal_conv1d(x, w, state), **tol)
    ref = torch.cat([torch.zeros(C, K - 1, dtype=dtype), x.t()], dim=1)[:, T : T + K - 1]
    torch.testing.assert_close(conv_state_at(x, None, T, K), ref)


def test_conv_update_equals_prefill():
    g = torch.Generator().manual_seed(1)
    N, C, K = 3, 10, 4
    w = torch.randn(C, K, generator=g)
    states = torch.randn(N, C, K - 1, generator=g)
    x = torch.randn(N, C, generator=g)
    new = states.clone()
    y = causal_conv1d_update_(x, w, new)  # new: updated in place
    for i in range(N):
        torch.testing.assert_close(y[i], causal_conv1d(x[i : i + 1], w, states[i])[0])
        torch.testing.assert_close(new[i], conv_state_at(x[i : i + 1], states[i], 1, K))


def _paged(seqs_kv, block_size, num_blocks, nkv, hd, seed=0):
    """Scatter each sequence's K/V into shuffled blocks; returns caches and block tables."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    kc = torch.zeros(num_blocks, block_size, nkv, hd)
    vc = torch.zeros_like(kc)
    max_blocks = max(-(-k.shape[0] // block_size) for k, _ in seqs_kv)
    tables = torch.zeros(len(seqs_kv), max_blocks + 2, dtype=torch.int32)  # padded width
    for i, (k, v) in enumerate(seqs_kv):
        nb = -(-k.shape[0] // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        slots = torch.tensor(
            [blocks[t // block_size] * block_size + t % block_size for t in range(k.shape[0])]
        )
        write_kv(kc, vc, k, v, slots)
    return kc, vc, tables


def test_paged_prefill_and_decode_attention():
    g = torch.Generator().manual_seed(2)
    nh, nkv, hd, bs = 4, 2, 8, 4
    lens = [9, 1, 14]
    kvs = [
        (torch.randn(n, nkv, hd, generator=g), torch.randn(n, nkv, hd, generator=g)) for n in lens
    ]
    kc, vc, tables = _paged(kvs, bs, 16, nkv, hd)
    for i, (k, v) in enumerate(kvs):
        torch.testing.assert_close(gather_kv(kc, tables[i], lens[i]), k)
        # the last 3 tokens (or fewer) as new queries over the cached context
        tq = min(3, lens[i])
        q = torch.randn(tq, nh, hd, generator=g)
        ref = naive_attention(q, k, v, hd**-0.5)
        out = prefill_attention(
            q, gather_kv(kc, tables[i], lens[i]), gather_kv(vc, tables[i], lens[i]), hd**-0.5
        )
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    q = torch.randn(len(lens), nh, hd, generator=g)
    out = decode_attention(q, kc, vc, tables, torch.tensor(lens), max(lens), hd**-0.5)
    for i, (k, v) in enumerate(kvs):
        ref = naive_attention(q[i : i + 1], k, v, hd**-0.5)[0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
    one = decode_attention(q[2:], kc, vc, tables[2:], torch.tensor(lens[2:]), lens[2], hd**-0.5)
    torch.testing.assert_close(one[0], out[2], atol=1e-5, rtol=1e-5)
