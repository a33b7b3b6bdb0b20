"""--kv-cache-dtype: the full-attention K/V caches in bf16 / fp16 under an fp32 model on a CPU
(what auto picks over weights stored below fp32), what it resolves to and what it refuses; the
engine on those caches against the op-by-op PyTorch path (QWEN35_NO_KERNELS: write_kv rounds
into the cache, the gather widens), against fp32 caches, batched == alone; the memory it
plans and reports."""

from __future__ import annotations

import pytest
import torch

from qwen35 import LLM, devices
from qwen35.errors import Qwen35Error
from qwen35.models import cpu_decode
from qwen35.request import SamplingParams
from test_parallel_engine import generate_with_logits
from tiny import save_checkpoint

PROMPTS = [[5, 9, 2, 7, 11, 3], list(range(3, 40)), [17, 4]]


def test_resolve_kv_dtype():
    r = devices.resolve_kv_dtype
    assert r("auto", "float32", "cpu") == "float32"  # fp32 weights: fp32 caches
    assert r("auto", "torch.float32", "cpu", True) == "bfloat16"  # bf16 / int8 / int4 / FP8
    assert r("auto", "bfloat16", "cpu", True) == "bfloat16"
    assert r("auto", "float32", "cuda", True) == "float32"
    assert r("bf16", "float32", "cpu") == "bfloat16"
    assert r("fp16", "float32", "cpu") == "float16"
    assert r("fp32", "float32", "cpu", True) == "float32"
    assert r("bf16", "bfloat16", "cuda:0") == "bfloat16"
    with pytest.raises(Qwen35Error, match="runs on a CPU only"):
        r("fp32", "bfloat16", "cuda:0")
    with pytest.raises(Qwen35Error, match="bf16 / fp16 under an fp32 model"):
        r("fp32", "bfloat16", "cpu")
    with pytest.raises(Qwen35Error, match="bf16 / fp16 under an fp32 model"):
        r("fp16", "bfloat16", "cpu")
    with pytest.raises(Qwen35Error, match="must be auto, fp32, bf16 or fp16"):
        r("int8", "float32", "cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv")
    save_checkpoint(d)  # fp32 weights
    return d


def _llm(ckpt, **kw):
    # head_screen off: every step's full logits come back from run_model (the int8 screen of
    # lm_head takes greedy tokens without them)
    return LLM(str(ckpt), dtype="fp32", head_screen=False, verbose=False, **kw)


def _run(llm, prompts, n=10):
    """Greedy tokens of each prompt and every step's logits."""
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    toks, logits = generate_with_logits(llm, [prompts], sp)
    assert len(logits) >= n
    return toks, logits


@pytest.mark.parametrize("kv", ["bf16", "fp16"])
def test_engine_on_half_precision_caches(ckpt, kv, monkeypatch):
    llm = _llm(ckpt, kv_cache_dtype=kv)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[kv]
    eng = llm.engine
    caches = eng.runner.caches
    assert all(c.dtype == want for c in caches.key + caches.value)
    assert all(c.dtype == torch.float32 for c in caches.conv + caches.recurrent)
    assert cpu_decode.supported(eng.model, caches)  # the decode plan still runs
    f32 = _llm(ckpt)  # auto over fp32 weights: fp32 caches
    assert f32.engine.runner.caches.key[0].dtype == torch.float32
    mem, mem32 = eng.rank_memory[0], f32.engine.rank_memory[0]
    assert 2 * mem["kv_bytes_per_token"] == mem32["kv_bytes_per_token"]
    assert mem["kv_dtype"] == str(want).removeprefix("torch.")
    assert 2 * eng.plan.kv_bytes_per_token == f32.engine.plan.kv_bytes_per_token

    toks, logits = _run(llm, PROMPTS)
    assert [_run(llm, [p])[0][0] for p in PROMPTS] == toks  # batched == alone
    ref_toks, ref_logits = _run(f32, PROMPTS)
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits, strict=True):  # only K / V rounded: close to fp32's
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0)  # measured: 6e-4 of logits ~0.7
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")  # the PyTorch ops on the same caches
    plain_toks, plain_logits = _run(_llm(ckpt, kv_cache_dtype=kv), PROMPTS)
    assert plain_toks == toks
    for a, b in zip(logits, plain_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_is_bf16_over_weights_stored_below_fp32(ckpt):
    """--dtype fp32 --quantization int8 (or bf16 storage, which --dtype auto picks on a CPU
    without native bf16): bf16 caches; an explicit fp32 is kept."""
    q = LLM(str(ckpt), dtype="fp32", quantization="int8", verbose=False)
    assert q.engine.runner.caches.key[0].dtype == torch.bfloat16
    keep = LLM(str(ckpt), dtype="fp32", quantization="int8", kv_cache_dtype="fp32", verbose=False)
    assert keep.engine.runner.caches.key[0].dtype == torch.float32


def test_refused_pairs_name_the_fix(ckpt):
    with pytest.raises(Qwen35Error, match="under a bfloat16 model.*use auto"):
        LLM(str(ckpt), dtype="bf16", kv_cache_dtype="fp32", verbose=False)
