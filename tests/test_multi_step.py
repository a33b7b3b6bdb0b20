"""Multi-step decoding (EngineConfig num_scheduler_steps, engine/model_runner.py _multi_step): k
decode steps per scheduling round, each fed the tokens the one before sampled on the device,
give every request the tokens single steps give; stops inside a round end the request there."""

from __future__ import annotations

import pytest

from qwen35.engine.model_runner import ModelRunner
from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams
from test_engine import (  # noqa: F401  (ckpt, moe_ckpt: fixtures)
    ckpt,
    ids,
    make,
    moe_ckpt,
    prompts,
    shared_prefix_workload,
)


def _counting(monkeypatch) -> list[int]:
    """The k of every multi-step round the runners run from now on."""
    ks: list[int] = []
    orig = ModelRunner._multi_step

    def spy(self, scheduled, k):
        ks.append(k)
        return orig(self, scheduled, k)

    monkeypatch.setattr(ModelRunner, "_multi_step", spy)
    return ks


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_random_workload_equals_single_steps(which, ckpt, moe_ckpt, monkeypatch):  # noqa: F811
    """Shared prefixes (prefix-cache hits), a KV pool small enough to preempt, a token budget
    that chunks prompts beside decode rows, uneven max_tokens (rounds cut short by them): each
    request's greedy tokens equal single-step decoding's, in fewer engine steps."""
    d, _ = ckpt if which == "dense" else moe_ckpt
    ps, sps = shared_prefix_workload(3, 10)
    kw = dict(block_size=4, max_num_seqs=16, max_num_batched_tokens=32, max_model_len=96)
    single = ids(make(d, **kw).generate(ps, sps))
    ks = _counting(monkeypatch)
    multi = make(d, num_scheduler_steps=4, num_kv_blocks=56, **kw)
    got = ids(multi.generate(ps, sps))
    assert got == single
    assert [len(t) for t in got] == [sp.max_tokens for sp in sps]
    assert ks and max(ks) == 4 and min(ks) >= 2  # rounds ran; some cut short by max_tokens
    stats = multi.engine.get_stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["num_preemptions"] > 0


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_two_ranks_equal_single_steps(which, ckpt, moe_ckpt, monkeypatch):  # noqa: F811
    """Under tensor parallelism each of a round's steps is broadcast with the tokens the one
    before sampled (rank 0 samples): the same tokens as one process's single steps."""
    d, _ = ckpt if which == "dense" else moe_ckpt
    ps, sps = shared_prefix_workload(3, 10)
    kw = dict(block_size=4, max_num_seqs=16, max_num_batched_tokens=32, max_model_len=96)
    single = ids(make(d, **kw).generate(ps, sps))
    ks = _counting(monkeypatch)
    multi = make(d, num_scheduler_steps=4, num_kv_blocks=56, tensor_parallel_size=2, **kw)
    try:
        assert ids(multi.generate(ps, sps)) == single
        assert ks and max(ks) == 4
        assert multi.engine.get_stats()["num_preemptions"] > 0
    finally:
        multi.engine.shutdown()


def test_preemption_under_multi_step(ckpt, monkeypatch):  # noqa: F811
    d, _ = ckpt
    ps = prompts(6, seed=4, lo=30, hi=60)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = ids(make(d).generate(ps, params))
    ks = _counting(monkeypatch)
    llm = make(d, block_size=4, max_model_len=96, num_kv_blocks=48, enable_prefix_caching=False,
               num_scheduler_steps=3)  # fmt: skip
    got = ids(llm.generate(ps, params))
    assert llm.engine.scheduler.num_preemptions > 0 and ks
    assert got == ref


def test_stops_inside_a_round(ckpt, monkeypatch):  # noqa: F811
    """A stop token, a stop string and EOS met at a token that is not a round's first: the
    output ends there as with single steps (the round's later tokens are dropped)."""
    d, _ = ckpt
    single, multi = make(d), make(d, num_scheduler_steps=8)
    ks = _counting(monkeypatch)
    p = prompts(1, seed=8)[0]
    full = single.generate([p], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    toks, text = full[0].outputs[0].token_ids, full[0].outputs[0].text
    # a token first met at output 5 (inside the first round of 8 after the prefill's token)
    j = next(i for i in range(3, len(toks)) if toks[i] not in toks[:i])
    cases = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[toks[j]]),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[text[5:8]]),
        SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
    ]
    for sp in cases:
        a, b = single.generate([p], sp)[0].outputs[0], multi.generate([p], sp)[0].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (
            a.token_ids, a.text, a.finish_reason, a.stop_reason)  # fmt: skip
    # EOS: the engine's EOS ids are the model's; make the 6th greedy token one of them
    for llm in (single, multi):
        llm.engine.scheduler.config.__dict__["eos_token_ids"] = (toks[j],)
    sp = SamplingParams(max_tokens=24, temperature=0.0)
    a, b = single.generate([p], sp)[0].outputs[0], multi.generate([p], sp)[0].outputs[0]
    assert b.token_ids == a.token_ids == toks[: j + 1] and b.finish_reason == "stop"
    assert ks and max(ks) == 8
    s = multi.engine.get_stats()
    assert s["num_running"] == 0 and s["state_slots_used"] == 0


def test_seeded_sampling_and_rows_that_need_the_host(ckpt, monkeypatch):  # noqa: F811
    """Seeded sampling draws the same tokens in rounds; a step with a row that needs the host
    (logprobs, a repetition penalty, pending min_tokens) runs one step, as before."""
    d, _ = ckpt
    ps = prompts(3, seed=5)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    single = make(d)
    ks = _counting(monkeypatch)
    multi = make(d, num_scheduler_steps=4)
    assert ids(multi.generate(ps, sp)) == ids(single.generate(ps, sp)) and ks
    two = SamplingParams(n=2, max_tokens=9, temperature=0.8, seed=5, ignore_eos=True)
    both = lambda outs: [[c.token_ids for c in o.outputs] for o in outs]  # noqa: E731
    assert both(multi.generate(ps, two)) == both(single.generate(ps, two))
    for host in (dict(logprobs=2), dict(repetition_penalty=1.3), dict(min_tokens=12)):
        ks.clear()
        sp2 = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **host)
        a, b = single.generate(ps, sp2), multi.generate(ps, sp2)
        assert ids(b) == ids(a) and not ks, host
        if "logprobs" in host:
            assert [o.outputs[0].logprobs for o in b] == [o.outputs[0].logprobs for o in a]


def test_config_refuses_what_it_cannot_run(ckpt):  # noqa: F811
    d, _ = ckpt
    with pytest.raises(Qwen35Error, match="num_scheduler_steps"):
        make(d, num_scheduler_steps=2, num_speculative_tokens=1)
    with pytest.raises(Qwen35Error, match="num_scheduler_steps"):
        make(d, num_scheduler_steps=0)
