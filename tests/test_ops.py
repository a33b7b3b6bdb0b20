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
    causal_conv1d_update,
    conv_state_at,
    naive_causal_conv1d,
)
from qwen35.ops.gated_delta import (
    chunk_gated_delta_rule,
    l2norm,
    naive_gated_delta_rule,
    recurrent_gated_delta_step,
)


def _delta_inputs(B, H, T, dk=16, dv=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, dk, generator=g)) * dk**-0.5
    k = l2norm(torch.randn(B, T, H, dk, generator=g))
    v = torch.randn(B, T, H, dv, generator=g)
    logdecay = -torch.rand(B, T, H, generator=g) * 0.5  # g <= 0
    beta = torch.rand(B, T, H, generator=g)
    s0 = torch.randn(B, H, dk, dv, generator=g)
    return q, k, v, logdecay, beta, s0


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 150])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive(T, with_state):
    q, k, v, g, beta, s0 = _delta_inputs(2, 3, T, seed=T)
    init = s0 if with_state else None
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, init)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, init)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_chunked_small_chunks_and_strong_decay():
    """Chunk size is not part of the math; strong decay exercises exp underflow."""
    q, k, v, g, beta, s0 = _delta_inputs(1, 2, 50, seed=3)
    g = g * 40
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0)
    for c in (8, 16, 64):
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk_size=c)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_recurrent_steps_equal_naive():
    q, k, v, g, beta, s0 = _delta_inputs(3, 2, 5, seed=7)
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0)
    S = s0.clone()
    for t in range(5):
        o_t = recurrent_gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        torch.testing.assert_close(o_t, o_ref[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S, s_ref, atol=1e-5, rtol=1e-5)


def test_chunked_split_equals_whole():
    """Running a prefix then the rest from its state equals one pass (prefix caching)."""
    q, k, v, g, beta, _ = _delta_inputs(1, 2, 100, seed=11)
    o_all, s_all = chunk_gated_delta_rule(q, k, v, g, beta)
    o1, s1 = chunk_gated_delta_rule(*(x[:, :37] for x in (q, k, v, g, beta)))
    o2, s2 = chunk_gated_delta_rule(*(x[:, 37:] for x in (q, k, v, g, beta)), s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_all, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_prefill_matches_reference_and_carries_state(dtype):
    g = torch.Generator().manual_seed(0)
    T, C, K = 20, 12, 4
    x = torch.randn(T, C, generator=g).to(dtype)
    w = torch.randn(C, K, generator=g).to(dtype)
    state = torch.randn(C, K - 1, generator=g).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for s in (None, state):
        y, ext = causal_conv1d(x, w, s)
        torch.testing.assert_close(y, naive_causal_conv1d(x, w, s), **tol)
    # split at 9: the second half from the state after 9 tokens equals the whole
    y_all, ext = causal_conv1d(x, w, state)
    y1, ext1 = causal_conv1d(x[:9], w, state)
    torch.testing.assert_close(conv_state_at(ext, 9, K), conv_state_at(ext1, 9, K))
    y2, _ = causal_conv1d(x[9:], w, conv_state_at(ext1, 9, K))
    torch.testing.assert_close(torch.cat([y1, y2]), y_all, **tol)


def test_conv_update_equals_prefill():
    g = torch.Generator().manual_seed(1)
    N, C, K = 3, 10, 4
    w = torch.randn(C, K, generator=g)
    states = torch.randn(N, C, K - 1, generator=g)
    x = torch.randn(N, C, generator=g)
    y, new = causal_conv1d_update(x, w, states)
    for i in range(N):
        y_ref, ext = causal_conv1d(x[i : i + 1], w, states[i])
        torch.testing.assert_close(y[i], y_ref[0])
        torch.testing.assert_close(new[i], conv_state_at(ext, 1, K))


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
