"""A prefill chunk after a cached prefix on the GPU path: the paged Triton kernel or the context
gathered for SDPA with a bottom-right causal bias (ops/attention.py), chosen by timing both at
engine start (engine/preflight.py), and the working memory the SDPA path adds. On a CPU: the
SDPA path against the reference, the dispatch, the choice with given timings, and the timing
loop itself (the Triton path cannot run without Triton: it times as inf, the other serves)."""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from qwen35.engine import cache_sizing, preflight
from qwen35.errors import Qwen35Error
from qwen35.ops import attention
from qwen35.ops.attention import (
    SDPA_MAX_CONTEXT,
    cached_prefill_attention,
    chunk_attention_path,
    naive_attention,
    sdpa_gather_bytes,
)
from qwen35.ops.backend import Backend, reference_backend

# the GPU path's dispatch on CPU tensors (interpret=True), SDPA chosen: no Triton kernel runs
SDPA = Backend(device_type="cuda", triton_attention=True, interpret=True, chunk_attention="sdpa")
CFG = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _chunk(dtype, start, Tq, nh=4, nkv=2, hd=16, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = -(-(start + Tq) // bs)
    kc = torch.randn(nb + 3, bs, nkv, hd, generator=g).to(dtype)
    vc = torch.randn(nb + 3, bs, nkv, hd, generator=g).to(dtype)
    row = torch.randperm(nb + 3, generator=g)[:nb].to(torch.int32)  # shuffled blocks
    q = torch.randn(Tq, nh, hd, generator=g).to(dtype)
    return q, kc, vc, row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,Tq", [(37, 5), (16, 33), (100, 1)])
def test_sdpa_chunk_equals_the_reference(dtype, start, Tq):
    q, kc, vc, row = _chunk(dtype, start, Tq)
    scale = 16**-0.5
    got = cached_prefill_attention(SDPA, q, kc, vc, row, start, scale)
    ref = cached_prefill_attention(reference_backend("cpu"), q, kc, vc, row, start, scale)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    # and the naive reference: query i sees the first start + i + 1 tokens
    k = attention.gather_kv(kc, row, start + Tq).float()
    v = attention.gather_kv(vc, row, start + Tq).float()
    for i in (0, Tq - 1):
        one = naive_attention(q[i : i + 1].float(), k[: start + i + 1], v[: start + i + 1], scale)
        torch.testing.assert_close(got[i].float(), one[0], **tol)


def test_chunk_path_dispatch():
    q = torch.zeros(3, 4, 16)
    assert chunk_attention_path(reference_backend("cpu"), q, 100) == "reference"
    triton = dataclasses.replace(SDPA, chunk_attention="triton")
    assert chunk_attention_path(triton, q, 100) == "triton"
    assert chunk_attention_path(SDPA, q, 100) == "sdpa"
    assert chunk_attention_path(SDPA, q, SDPA_MAX_CONTEXT) == "sdpa"
    # past the gathered K/V the working memory counts: the paged kernel
    assert chunk_attention_path(SDPA, q, SDPA_MAX_CONTEXT + 1) == "triton"


def _model():
    return SimpleNamespace(config=CFG, device=torch.device("cpu"))


def test_choice_takes_the_faster_path(monkeypatch):
    be = dataclasses.replace(SDPA, chunk_attention="triton")
    monkeypatch.delenv("QWEN35_CHUNK_ATTENTION", raising=False)
    for times, want in (({"triton": 2e-3, "sdpa": 1e-3}, "sdpa"),
                        ({"triton": 1e-3, "sdpa": 2e-3}, "triton"),
                        ({"triton": 1e-3, "sdpa": float("inf")}, "triton"),
                        ({"triton": float("inf"), "sdpa": 5e-3}, "sdpa")):  # fmt: skip
        monkeypatch.setattr(preflight, "time_chunk_attention", lambda *a, t=times, **k: t)
        got = preflight.choose_chunk_attention(_model(), be, torch.float32, 16)
        assert got.chunk_attention == want, times
    # without our Triton attention nothing is timed and nothing changes
    monkeypatch.setattr(preflight, "time_chunk_attention", lambda *a, **k: pytest.fail("timed"))
    plain = reference_backend("cpu")
    assert preflight.choose_chunk_attention(_model(), plain, torch.float32, 16) == plain


def test_choice_forced_by_the_environment(monkeypatch):
    monkeypatch.setattr(preflight, "time_chunk_attention", lambda *a, **k: pytest.fail("timed"))
    be = dataclasses.replace(SDPA, chunk_attention="triton")
    monkeypatch.setenv("QWEN35_CHUNK_ATTENTION", "sdpa")
    assert preflight.choose_chunk_attention(_model(), be, torch.float32, 16).chunk_attention == "sdpa"
    monkeypatch.setenv("QWEN35_CHUNK_ATTENTION", "flash")
    with pytest.raises(Qwen35Error, match="QWEN35_CHUNK_ATTENTION='flash': use one of"):
        preflight.choose_chunk_attention(_model(), be, torch.float32, 16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None,
                    reason="Triton is installed: the Triton path would run interpreted")  # fmt: skip
def test_timing_runs_both_paths_and_an_unrunnable_one_is_inf(monkeypatch):
    """Without Triton (the CPU test environment) the Triton path cannot run: it times as inf
    and the SDPA path, which runs, is taken."""
    calls = []
    real = attention.cached_prefill_attention

    def counted(be, *a):
        calls.append(be.chunk_attention)
        return real(be, *a)

    monkeypatch.setattr(attention, "cached_prefill_attention", counted)
    times = preflight.time_chunk_attention(CFG, torch.float32, torch.device("cpu"), SDPA, 16,
                                           queries=8, start=40, reps=3)  # fmt: skip
    assert times["triton"] == float("inf")
    assert 0 < times["sdpa"] < float("inf")
    assert calls.count("sdpa") == 4 and calls.count("triton") == 1  # a failed path is not retried


@pytest.mark.parametrize("path", ["triton", "sdpa"])
def test_working_memory_counts_the_gathered_context(monkeypatch, path):
    dtype = torch.bfloat16
    be = Backend(device_type="cuda", triton_attention=True)
    monkeypatch.setattr(preflight, "select_backend", lambda *a, **k: be)
    monkeypatch.setattr(preflight, "check_kernels", lambda model, b, bs, **k: b)
    monkeypatch.setattr(preflight, "choose_chunk_attention",
                        lambda model, b, dt, bs, **k: dataclasses.replace(b, chunk_attention=path))  # fmt: skip
    monkeypatch.setattr(cache_sizing, "measure_working_memory", lambda *a, **k: 1000)
    got_be, working = preflight.gpu_start(_model(), dtype, 2048, 8, 16)
    assert got_be.chunk_attention == path
    gathered = 2 * SDPA_MAX_CONTEXT * CFG.num_key_value_heads * CFG.head_dim * 2
    assert sdpa_gather_bytes(CFG, dtype) == gathered
    # fp8 caches: gathered as fp8 (1 byte), then widened to the model dtype
    assert sdpa_gather_bytes(CFG, dtype, torch.float8_e4m3fn) == gathered * 3 // 2
    assert working == 1000 + (gathered if path == "sdpa" else 0)
