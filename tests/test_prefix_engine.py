"""Prefix caching through the real model (issue 6): outputs with caching == without, token-exact,
and hits where they should be."""

from __future__ import annotations

import random

import pytest

from qwen35.engine.llm_engine import LLM
from qwen35.request import SamplingParams
from tiny import save_checkpoint

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BS = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefix") / "m"
    save_checkpoint(d, moe=False, layout="vlm", max_position_embeddings=16384)
    return d


def rand_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 256) for _ in range(n)]


def pair(d, **kw) -> tuple[LLM, LLM]:
    base = dict(dtype="fp32", block_size=BS, verbose=False, **kw)
    return LLM(str(d), enable_prefix_caching=True, **base), LLM(
        str(d), enable_prefix_caching=False, **base
    )


def run_each(llm: LLM, prompts) -> list[list[int]]:
    """One request after another, so later ones can hit what earlier ones cached."""
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]


def hit_tokens(llm: LLM) -> int:
    return llm.engine.get_stats()["prefix_cache_hit_tokens"]


@pytest.mark.parametrize("prefix_len", [100, 5000])
def test_shared_system_prompt(ckpt, prefix_len):
    on, off = pair(ckpt, max_num_batched_tokens=4096)
    system = rand_tokens(prefix_len, 1)
    prompts = [system + rand_tokens(5 + i, 100 + i) for i in range(4)]
    assert run_each(on, prompts) == run_each(off, prompts)
    # the 2nd request already resumes from a checkpoint inside the shared prefix
    assert hit_tokens(on) >= 3 * (
        prefix_len // BS * BS - on.engine.scheduler.config.checkpoint_interval
    )
    assert hit_tokens(off) == 0


def test_multi_turn_hits_history(ckpt):
    on, off = pair(ckpt)
    convo = rand_tokens(40, 2)
    prompts = []
    for turn in range(4):
        prompts.append(list(convo))
        reply = off.generate([convo], GREEDY)[0].outputs[0].token_ids
        convo = convo + reply + rand_tokens(7, 200 + turn)
    outs_on = []
    for p in prompts:
        outs_on.append(on.generate([p], GREEDY)[0])
    assert [o.outputs[0].token_ids for o in outs_on] == run_each(off, prompts)
    # each later turn reuses the earlier history (up to its last full-block checkpoint)
    for prev, o in zip(prompts, outs_on[1:], strict=False):  # prompt k, output k + 1
        assert o.num_cached_tokens >= (len(prev) // BS) * BS - BS


@pytest.mark.parametrize("prefix_len", [BS, BS + 7, 3 * BS - 1])
def test_prefix_exactly_one_block_and_mid_block(ckpt, prefix_len):
    on, off = pair(ckpt)
    shared = rand_tokens(prefix_len, 3)
    prompts = [shared + rand_tokens(4, 300 + i) for i in range(3)]
    assert run_each(on, prompts) == run_each(off, prompts)
    assert hit_tokens(on) > 0  # full blocks of the prefix hit, the partial block is recomputed


def test_evicted_then_recomputed(ckpt):
    # a tiny KV pool: later requests evict the cached prefix, which must then be recomputed
    on, off = pair(ckpt, num_kv_blocks=14, max_model_len=200)
    a, b = rand_tokens(150, 4), rand_tokens(150, 5)
    prompts = [a, b, a + [7], b + [9], a]
    assert run_each(on, prompts) == run_each(off, prompts)
    stats = on.engine.scheduler.prefix_cache_stats()
    assert stats.block_evictions > 0


def test_concurrent_requests_sharing_a_prefix_being_prefilled(ckpt):
    on, off = pair(ckpt, max_num_batched_tokens=48)
    shared = rand_tokens(300, 6)
    prompts = [shared + rand_tokens(3, 400 + i) for i in range(5)]
    eng = on.engine
    outs = {}
    # request i arrives after i steps: the shared prefix is still being prefilled by earlier ones
    for step in range(10_000):
        if step < len(prompts):
            eng.add_request(f"r{step}", prompts[step], SamplingParams(**vars(GREEDY)))
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        if step >= len(prompts) and not eng.has_unfinished_requests():
            break
    got = [outs[f"r{i}"] for i in range(len(prompts))]
    assert got == run_each(off, prompts)
    assert hit_tokens(on) > 0


def test_switch_and_stats(ckpt):
    on, off = pair(ckpt)
    p = rand_tokens(200, 7)
    run_each(on, [p, p])
    s = on.engine.get_stats()
    assert s["prefix_cache_hits"] >= 1 and s["prefix_cache_hit_tokens"] >= 160
    run_each(off, [p, p])
    assert off.engine.get_stats()["prefix_cache_hits"] == 0


def test_cache_salt_keeps_tenants_apart(ckpt):
    """vLLM's cache_salt: equal prompts hit the cache only under the same salt (and outputs
    stay equal to uncached ones whatever the salt)."""
    import dataclasses

    on, off = pair(ckpt)
    prompt = rand_tokens(100, 3)

    def run(salt):
        params = dataclasses.replace(GREEDY, cache_salt=salt)
        return on.generate([prompt], params)[0]

    want = off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    first = run("tenant-a")
    assert first.num_cached_tokens == 0 and first.outputs[0].token_ids == want
    assert run("tenant-b").num_cached_tokens == 0  # another salt: no hit
    assert run(None).num_cached_tokens == 0  # no salt is a salt of its own
    again = run("tenant-a")
    assert again.num_cached_tokens >= 100 // BS * BS - BS and again.outputs[0].token_ids == want
    assert run(None).num_cached_tokens > 0
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        run("")
