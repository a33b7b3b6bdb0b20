"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's option; the server's echo + logprobs):
each prompt token's logprob given the tokens before it, its rank and the top-n, equal to the
log_softmax of transformers' logits over the whole prompt, whatever the chunking, batching,
prefix cache, preemption or speculative decoding."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from qwen35.engine.llm_engine import LLM
from qwen35.request import SamplingParams, SamplingParamsError
from tiny import hf_torch_path, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("plp") / "dense"
    return d, save_checkpoint(d, moe=False, mtp=True)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("plp") / "moe"
    return d, save_checkpoint(d, moe=True, experts="per_expert")


def make(d, **kw) -> LLM:
    kw.setdefault("dtype", "fp32")
    kw.setdefault("verbose", False)
    return LLM(str(d), **kw)


def prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def params(n_top: int = 3, **kw) -> SamplingParams:
    kw = {"max_tokens": 3, "temperature": 0.0, **kw}
    return SamplingParams(ignore_eos=True, prompt_logprobs=n_top, **kw)


def reference(hf, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over the whole prompt: row k predicts token k + 1."""
    with hf_torch_path(), torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check(out, hf, prompt: list[int], n_top: int) -> None:
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    ref = reference(hf, prompt)
    for k, lp in enumerate(got[1:]):
        row, tok = ref[k], prompt[k + 1]
        assert lp.token_id == tok
        assert abs(lp.logprob - row[tok].item()) < 1e-4
        assert lp.rank == int((row > row[tok]).sum()) + 1
        want = row.topk(n_top)
        assert list(lp.top) == want.indices.tolist()  # most likely first
        assert torch.allclose(torch.tensor(list(lp.top.values())), want.values, atol=1e-4)


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_equal_transformers_batched_and_chunked(which, ckpt, moe_ckpt):
    d, hf = ckpt if which == "dense" else moe_ckpt
    ps = prompts(4, seed=1)
    # chunks of 16 tokens beside other sequences' rows, and a 64-row head slice crossed
    llm = make(d, block_size=4, max_num_batched_tokens=16)
    outs = llm.generate(ps, params(3))
    for p, out in zip(ps, outs, strict=True):
        check(out, hf, p, 3)
    whole = make(d, block_size=4).generate(ps, params(3))
    for a, b in zip(outs, whole, strict=True):  # the generated tokens are unchanged too
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize(
    "which,kw",
    [("dense", {}), ("dense", dict(num_speculative_tokens=2)),
     ("moe", dict(enable_expert_parallel=True))],
)  # fmt: skip
def test_two_ranks(which, kw, ckpt, moe_ckpt):
    """Under tensor (and expert) parallelism, with or without drafts: the head over the prompt
    rows is mirrored on the worker (its vocabulary slice, gathered), so the logprobs are
    transformers' and the tokens one process's."""
    d, hf = ckpt if which == "dense" else moe_ckpt
    ps = prompts(3, seed=5) + prompts(1, seed=6, lo=150, hi=151)  # > 2 x 64 rows in one step
    one = make(d, block_size=4).generate(ps, params(3))
    llm = make(d, block_size=4, max_num_batched_tokens=160, tensor_parallel_size=2, **kw)
    try:
        outs = llm.generate(ps, params(3))
    finally:
        llm.engine.shutdown()
    for p, out, ref in zip(ps, outs, one, strict=True):
        check(out, hf, p, 3)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_many_rows_in_one_chunk_cross_the_head_slices(ckpt):
    d, hf = ckpt
    p = prompts(1, seed=2, lo=150, hi=151)[0]  # > 2 x PROMPT_LOGPROB_ROWS rows in one step
    check(make(d).generate([p], params(0))[0], hf, p, 0)


def test_zero_top_and_one_token_prompt(ckpt):
    d, hf = ckpt
    llm = make(d)
    one = llm.generate([[7]], params(0))[0]
    assert one.prompt_logprobs == [None]
    p = prompts(1, seed=3)[0]
    out = llm.generate([p], params(0))[0]
    check(out, hf, p, 0)
    assert all(lp.top == {} for lp in out.prompt_logprobs[1:])
    assert llm.generate([p], SamplingParams(max_tokens=2))[0].prompt_logprobs is None


def test_prefix_cache_hits_are_not_used_but_filled(ckpt):
    d, hf = ckpt
    p = prompts(1, seed=4, lo=80, hi=81)[0]
    llm = make(d, block_size=4)
    llm.generate([p], SamplingParams(max_tokens=2))  # caches the prompt's blocks
    warm = llm.generate([p], SamplingParams(max_tokens=2))[0]
    assert warm.num_cached_tokens > 0
    scored = llm.generate([p], params(2))[0]
    assert scored.num_cached_tokens == 0  # every row's logits were needed
    check(scored, hf, p, 2)
    # a scoring request's blocks serve later requests
    llm2 = make(d, block_size=4)
    llm2.generate([p], params(2))
    assert llm2.generate([p], SamplingParams(max_tokens=2))[0].num_cached_tokens > 0


def test_preempted_mid_prompt(ckpt):
    d, hf = ckpt
    ps = prompts(6, seed=5, lo=30, hi=60)
    llm = make(d, block_size=4, max_model_len=96, num_kv_blocks=48, max_num_batched_tokens=8,
               enable_prefix_caching=False)  # fmt: skip
    outs = llm.generate(ps, params(1, max_tokens=30))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(ps, outs, strict=True):
        check(out, hf, p, 1)


def test_n_and_streaming(ckpt):
    d, hf = ckpt
    p = prompts(1, seed=6, lo=70, hi=71)[0]
    llm = make(d, block_size=4, max_num_batched_tokens=64)
    sched = llm.engine.scheduler  # the first sequence's prompt: 5 steps
    sched.config = dataclasses.replace(sched.config, max_chunk_tokens=16)
    llm.generate([p], SamplingParams(max_tokens=1))  # cached: the other n - 1 sequences hit it
    deltas = list(llm.stream(p, params(1, n=3, temperature=1.0, seed=5, max_tokens=4)))
    assert max(o.num_cached_tokens for o in deltas) > 0  # (a sibling ran ahead of the first)
    # no sequence's tokens come before the prompt logprobs, which come once
    assert deltas[0].prompt_logprobs is not None and deltas[0].outputs
    check(deltas[0], hf, p, 1)
    assert all(o.prompt_logprobs is None for o in deltas[1:])
    out = llm.generate([p], params(1, n=3, temperature=1.0, seed=5))[0]
    check(out, hf, p, 1)
    assert len(out.outputs) == 3


def test_with_speculative_decoding(ckpt):
    d, hf = ckpt
    ps = prompts(3, seed=7)
    llm = make(d, num_speculative_tokens=2)
    assert llm.engine.runner.spec is not None
    plain = make(d).generate(ps, params(2, max_tokens=8))
    for p, out, ref in zip(ps, llm.generate(ps, params(2, max_tokens=8)), plain, strict=True):
        check(out, hf, p, 2)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "3", True])
def test_bad_values_are_refused(bad):
    with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad).validate()
