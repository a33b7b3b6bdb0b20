"""Speculative decoding with n-gram (prompt-lookup) drafts (`speculative_method="ngram"`,
engine/speculative.py ngram_drafts): no MTP head needed (a checkpoint without `mtp.*`); the
lookup against a plain reference; greedy and seeded tokens equal those without drafts, batched,
with preemption-free prompts that repeat themselves (drafts accepted) and ones that never do."""

from __future__ import annotations

import dataclasses
import random

import pytest

from qwen35.engine.llm_engine import LLM
from qwen35.engine.speculative import ngram_drafts
from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams
from tiny import save_checkpoint


def reference_lookup(tokens, end, k, n_min, n_max):
    hist = list(tokens[:end])
    for n in range(min(n_max, end - 1), n_min - 1, -1):
        tail = hist[end - n :]
        for i in range(end - n - 1, -1, -1):  # the latest earlier occurrence
            if hist[i : i + n] == tail:
                return hist[i + n : min(i + n + k, end)]
    return []


def test_lookup_equals_the_reference():
    rng = random.Random(0)
    for _ in range(300):
        toks = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        end = rng.randrange(1, len(toks) + 1)
        k, lo = rng.randrange(1, 5), rng.randrange(1, 3)
        hi = lo + rng.randrange(0, 3)
        assert ngram_drafts(toks, end, k, lo, hi) == reference_lookup(toks, end, k, lo, hi)
    assert ngram_drafts([1, 2, 3, 9, 1, 2, 3], 7, 3, 2, 4) == [9, 1, 2]
    assert ngram_drafts([5, 6, 7], 3, 2, 1, 2) == []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ngram") / "m"
    save_checkpoint(d)  # (its MTP head is partial: the MTP method could not load it)
    return d


def make(d, k=0, **kw) -> LLM:
    opts = dict(dtype="fp32", verbose=False, max_model_len=256, max_num_seqs=4,
                max_memory="256MiB")  # fmt: skip
    if k:
        opts.update(num_speculative_tokens=k, speculative_method="ngram")
    return LLM(str(d), **{**opts, **kw})


def prompts() -> list[list[int]]:
    rng = random.Random(1)
    phrase = [rng.randrange(2, 250) for _ in range(12)]
    return [phrase * 4, [rng.randrange(2, 250) for _ in range(40)], phrase * 2 + [7, 7, 7]]


@pytest.mark.parametrize("k", [1, 3])
def test_tokens_equal_without_drafts(ckpt, k):
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True)
    plain = make(ckpt)
    spec = make(ckpt, k)
    for sp in (greedy, seeded):
        want = [o.outputs[0].token_ids for o in plain.generate(prompts(), sp)]
        assert [o.outputs[0].token_ids for o in spec.generate(prompts(), sp)] == want
        assert [spec.generate([p], sp)[0].outputs[0].token_ids for p in prompts()] == want
    stats = spec.engine.get_stats()
    assert stats["spec_drafts_total"] > 0 and stats["spec_accepted_total"] > 0


def test_refusals(ckpt):
    with pytest.raises(Qwen35Error, match="prompt_lookup_min"):
        make(ckpt, 2, prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(Qwen35Error, match="MTP"):  # the MTP method needs the head
        LLM(str(ckpt), dtype="fp32", verbose=False, num_speculative_tokens=1,
            max_memory="256MiB")  # fmt: skip


def test_caches_equal_the_planners(ckpt):
    """`qwen35 plan --speculative-method ngram` counts what the engine allocates: a spare state
    per draft and sequence, and no MTP KV layer (the MTP method's plan has one more)."""
    from qwen35.plan.planner import Deployment

    engine = make(ckpt, 3).engine
    plan, cfg = engine.plan, engine.config
    ngram = Deployment(cfg, kv_dtype="fp32", speculative_tokens=3, speculative_method="ngram")
    with_head = dataclasses.replace(cfg, mtp_num_hidden_layers=1)  # (this checkpoint has none)
    mtp = Deployment(with_head, kv_dtype="fp32", speculative_tokens=3)
    assert plan.kv_bytes_per_token == ngram.caches.kv_bytes_per_token
    assert plan.kv_bytes_per_token < mtp.caches.kv_bytes_per_token
    assert plan.num_spare_slots == 3 * plan.num_state_slots
    assert ngram.caches.spare_states == 3 and ngram.caches.mtp_layers == 0
    assert ngram.caches.running_state_bytes == 4 * ngram.caches.state_bytes_per_sequence
