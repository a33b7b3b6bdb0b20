"""LLMEngine bookkeeping: a finished choice is reported once; the engine seed."""

from __future__ import annotations

import pytest

from qwen35.engine.llm_engine import LLM
from qwen35.request import SamplingParams
from tiny import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-state")
    save_checkpoint(d, moe=False, layout="vlm")
    return d


def make(d, **kw) -> LLM:
    return LLM(str(d), dtype="fp32", verbose=False, **kw)


def test_finished_choice_is_reported_once(ckpt):
    # n = 2, choice 0 given a shorter length after the add: once it has sent its
    # finish_reason, the later steps of its sibling carry nothing more for it
    e = make(ckpt).engine
    sp = SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True)
    e.add_request("r", [5, 6, 7], sp)
    e._requests["r"].seqs[0].seq.params = SamplingParams(max_tokens=2, ignore_eos=True)
    finishes: dict[int, int] = {}
    tokens: dict[int, int] = {}
    while e.has_unfinished_requests():
        for out in e.step():
            for o in out.outputs:
                tokens[o.index] = tokens.get(o.index, 0) + len(o.token_ids)
                finishes[o.index] = finishes.get(o.index, 0) + (o.finish_reason is not None)
    assert tokens == {0: 2, 1: 6}
    assert finishes == {0: 1, 1: 1}


def test_engine_seed_makes_unseeded_requests_reproducible(ckpt):
    sp = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)  # no per-request seed
    prompts = [[5, 6, 7], [9, 10, 11, 12]]

    def run(seed):
        return [o.outputs[0].token_ids for o in make(ckpt, seed=seed).generate(prompts, sp)]

    assert run(3) == run(3)
    assert run(3) != run(4)
