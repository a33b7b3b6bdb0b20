"""The fused small CPU ops (qwen35.kernels.small_ops) against their PyTorch references, and
their dispatch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kernel_modules import native_or_skip
from qwen35 import kernels
from qwen35.kernels import small_ops
from qwen35.layers.norms import GatedRMSNorm, RMSNorm, gated_rms_norm, rms_norm_zc
from qwen35.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk
from qwen35.ops import deltanet as deltanet_ops
from qwen35.ops.backend import reference_backend, select_backend
from qwen35.ops.pointwise import silu_mul, silu_mul_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def mod():
    return native_or_skip(small_ops.SMALL_OPS, "the small-op kernels")


def _tol(dtype):
    """fp32: summation order only; bf16 / fp16: one rounding step of the model dtype."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=1e-2, rtol=1.6e-2 if dtype == torch.bfloat16 else 2e-3)


def _packed(T, widths, dtype, seed=0):
    """Column slices of one [T, sum(widths)] tensor, like a packed projection's outputs."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(T, sum(widths), generator=g).mul_(2).to(dtype)
    return full.split(widths, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1024, 37])  # 37: a tail shorter than a vector
def test_rms_norms_match_reference(mod, dtype, D):
    x, delta, h = _packed(5, [D, D, D], dtype)
    w = torch.randn(D).mul_(0.1).to(dtype)
    torch.testing.assert_close(mod.rms_norm_zc(x, w, 1e-6), rms_norm_zc(x, w, 1e-6), **_tol(dtype))
    h1, h2 = h.contiguous(), h.contiguous()
    out = mod.add_rms_norm_zc_(h1, delta, w, 1e-6)
    ref = rms_norm_zc(h2.add_(delta), w, 1e-6)
    assert torch.equal(h1, h2)  # the residual add is exact, in the model dtype
    torch.testing.assert_close(out, ref, **_tol(dtype))
    # 3-D views with strided heads: q_norm on the q half of [T, heads, 2 hd]
    hd = D // 4
    qg = x[:, : 4 * hd].unflatten(-1, (2, 2 * hd))[..., :hd]  # [T, 2, hd], rows strided
    wq = w[:hd].contiguous()
    torch.testing.assert_close(
        mod.rms_norm_zc(qg, wq, 1e-6), rms_norm_zc(qg, wq, 1e-6), **_tol(dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dv", [128, 20])
def test_gated_norm_matches_reference(mod, dtype, dv):
    nv = 3
    o, z = _packed(4, [nv * dv, nv * dv], dtype, seed=1)
    o, z = o.contiguous().unflatten(-1, (nv, dv)), z.unflatten(-1, (nv, dv))  # z strided
    w = torch.randn(dv).to(dtype)
    ref = gated_rms_norm(o, z, w, 1e-6)
    torch.testing.assert_close(mod.gated_rms_norm(o, z, w, 1e-6), ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [3584, 45])
def test_silu_mul_matches_reference(mod, dtype, N):
    gate, up = _packed(3, [N, N], dtype, seed=2)
    out = mod.silu_mul(gate, up)
    assert out.is_contiguous()
    torch.testing.assert_close(out, silu_mul_reference(gate.clone(), up), **_tol(dtype))
    # large magnitudes: exp's range reduction and clamping
    big = torch.tensor([[-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0] * 2]).to(dtype)
    torch.testing.assert_close(
        mod.silu_mul(big, torch.ones_like(big)), silu_mul_reference(big.clone(), torch.ones_like(big)),
        **_tol(dtype),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_deltanet_gates_match_reference(mod, dtype):
    a, b = _packed(6, [16, 16], dtype, seed=3)
    a = a * 12  # reaches softplus's linear branch (> 20)
    dt_bias, A_log = torch.randn(16).to(dtype), torch.randn(16).to(dtype)
    g, beta = mod.deltanet_gates(a, b, dt_bias, A_log)
    g_ref = F.softplus(a.float() + dt_bias).mul_(A_log.float().exp().neg_())
    assert g.dtype == torch.float32 and beta.dtype == dtype
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(beta, torch.sigmoid(b), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(mod, dtype):
    """Partial rotary (64 of 256 dims, as Qwen 3.5) on q and k in place; q a strided view."""
    g = torch.Generator().manual_seed(6)
    T, nh, nkv, hd, rd = 5, 4, 2, 256, 64
    q = torch.randn(T, nh, 2 * hd, generator=g).to(dtype)[..., :hd]  # rows strided
    k = torch.randn(T, nkv, hd, generator=g).to(dtype)
    pos = torch.arange(100, 100 + T)
    cos, sin = RotaryEmbedding(rd, 1e7).cos_sin(pos, dtype)
    rq, rk = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    mod.rotary_qk_(q, k, cos, sin)
    torch.testing.assert_close(q, rq, **_tol(dtype))
    torch.testing.assert_close(k, rk, **_tol(dtype))
    assert torch.equal(q[..., rd:], rq[..., rd:])  # the dims past rotary_dim pass through


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv_matches_reference(mod, dtype):
    """causal_conv1d_silu against ops/conv.py causal_conv1d: chunk lengths below, at and above
    the K - 1 rows that read the state, with a state and without, rows strided (a column slice
    of the packed projection), channels with a tail shorter than a vector; bf16 / fp16 bit for
    bit (the same fp32 sums, rounded once), fp32 within its ulps (the SiLU's exp)."""
    from qwen35.ops.conv import causal_conv1d

    g = torch.Generator().manual_seed(7)
    for T in (1, 2, 3, 5, 64, 130):
        for C, K in ((256, 4), (77, 4), (40, 2)):
            x = torch.randn(T, C + 24, generator=g).mul_(2).to(dtype)[:, 16 : 16 + C]
            w = torch.randn(C, K, generator=g).to(dtype)
            state = torch.randn(C, K - 1, generator=g).to(dtype)
            for s in (None, state):
                got, ref = mod.causal_conv1d_silu(x, w, s), causal_conv1d(x, w, s)
                assert got.shape == ref.shape and got.dtype == dtype
                if dtype == torch.float32:
                    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
                else:
                    assert torch.equal(got, ref), (T, C, K, s is None)


def test_causal_conv_continues_from_its_state(mod):
    """A chunk continued from the conv state after the rows before it gives the rows the whole
    sequence gives, bit for bit (prefill split into chunks, or after a cached prefix)."""
    from qwen35.ops.conv import conv_state_at

    x = torch.randn(40, 64).to(torch.bfloat16)
    w = torch.randn(64, 4).to(torch.bfloat16)
    whole = mod.causal_conv1d_silu(x, w)
    for a in (1, 2, 3, 17):
        state = conv_state_at(x[:a], None, a, 4).contiguous()
        assert torch.equal(mod.causal_conv1d_silu(x[a:], w, state), whole[a:]), a
    with pytest.raises(RuntimeError, match=r"state \[C, K - 1\]"):
        mod.causal_conv1d_silu(x, w, torch.zeros(64, 2).to(torch.bfloat16))


def test_rows_are_independent(mod):
    """Batched and single-row calls give bitwise the same rows (batch invariance)."""
    x, z = _packed(7, [256, 256], torch.bfloat16, seed=4)
    w = torch.randn(256).to(torch.bfloat16)
    for f in (
        lambda x, z: mod.rms_norm_zc(x, w, 1e-6),
        lambda x, z: mod.gated_rms_norm(x, z, w, 1e-6),
        lambda x, z: mod.silu_mul(x, z),
    ):
        full = f(x, z)
        assert all(torch.equal(f(x[i : i + 1], z[i : i + 1])[0], full[i]) for i in range(7))


def test_bad_input_is_refused(mod):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight and input dtypes differ"):
        mod.rms_norm_zc(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="fp32, bf16 or fp16"):
        mod.rms_norm_zc(x.double(), torch.ones(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="last dim must be contiguous"):
        mod.silu_mul(x.t(), x.t())


def test_dispatch_takes_the_kernels_and_switches_off(mod, monkeypatch):
    """A CPU backend with kernels calls the C++ ops; the reference backend and
    QWEN35_NO_KERNELS=1 (also after loading) run the PyTorch references."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(mod, name)

    monkeypatch.setattr(small_ops.SMALL_OPS, "_module", Spy())
    be = select_backend("cpu")
    assert be.cpu_small_ops is not None and "cpu-small-ops" in be.name
    norm, gated = RMSNorm(16), GatedRMSNorm(16)
    for p in (norm.weight, gated.weight):
        p.data.normal_()
    x, z = torch.randn(2, 16), torch.randn(2, 16)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    bias, alog = torch.randn(4), torch.randn(4)
    cos, sin = RotaryEmbedding(8, 1e4).cos_sin(torch.tensor([3, 9]), torch.float32)

    dims = deltanet_ops.Dims(nk=1, nv=2, dk=4, dv=4, kernel_size=4)  # conv channels 16
    qkv, conv_w = torch.randn(5, 16), torch.randn(16, 4)
    seq = SimpleNamespace(rows=slice(0, 5), slot=1, has_initial_state=True, checkpoints=[],
                          num_tokens=5)  # fmt: skip

    caches = torch.randn(2, 16, 3), torch.randn(2, 2, 4, 4)  # conv, recurrent
    log_decay, beta = -torch.rand(5, 2), torch.rand(5, 2)

    def run(backend):
        conv_cache, rec_cache = (c.clone() for c in caches)
        o = torch.empty(5, 2, 4)
        deltanet_ops.deltanet_prefill(backend, qkv, log_decay, beta, conv_w, dims, [seq],
                                      conv_cache, rec_cache, o)  # fmt: skip
        out = [
            norm(x, backend),
            norm.add_forward(x.clone(), z, backend),
            gated(x, z, backend),
            silu_mul(backend, x.clone(), z),
            *deltanet_ops.deltanet_gates(backend, a, b, bias, alog),
            *apply_rotary_qk(x[:, None].clone(), z[:, None].clone(), cos, sin, backend),
            o, conv_cache, rec_cache,
        ]
        return out

    fast = run(be)
    assert sorted(set(calls)) == [
        "add_rms_norm_zc_", "causal_conv1d_silu", "deltanet_gates", "gated_rms_norm",
        "rms_norm_zc", "rotary_qk_", "silu_mul",
    ]  # fmt: skip
    calls.clear()
    ref = run(reference_backend("cpu"))
    assert calls == []
    for f, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    assert kernels.switched_off()
    run(be)
    assert calls == []


def test_argmax_rows_equals_torch_max_indices(mod):
    """The sampler's argmax: torch's max(-1).indices, ties to the first, a NaN wins, -inf rows,
    a vocabulary that is not a multiple of 8 (the scalar tail), strided rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1003, generator=g)
    x[1, 500] = x[1, 7] = 9.0  # a tie: the first wins
    x[2, 1001] = 50.0  # the maximum in the tail
    x[3, 900] = float("nan")
    x[3, 950] = float("nan")
    x[4] = float("-inf")
    x[5, 3] = float("inf")
    for rows in (x, x[:, :1001], x[:, 2:]):  # strided rows
        torch.testing.assert_close(mod.argmax_rows(rows), rows.max(dim=-1).indices)
    with pytest.raises(RuntimeError, match="fp32"):
        mod.argmax_rows(x.bfloat16())
    from qwen35.engine.sampler import argmax

    assert torch.equal(argmax(x), x.max(dim=-1).indices)
    assert torch.equal(argmax(x.double()), x.double().max(dim=-1).indices)  # torch's path
