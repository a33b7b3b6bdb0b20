"""LLMEngine bookkeeping: a finished choice is reported once; the engine seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_token_tail_reads_the_output_without_copying():
    from qwen35.engine.sequence import TokenTail

    ids = [1, 2, 3, 4, 5]
    t = TokenTail(ids, 2, (9,))
    assert len(t) == 4 and list(t) == [3, 4, 5, 9] and t[0] == 3 and t[-1] == 9 and t[3] == 9
    assert t[1:3] == [4, 5] and t[-2] == 5
    with pytest.raises(IndexError):
        t[4]
    ids.append(6)  # a view: the list's later tokens show
    assert list(t) == [3, 4, 5, 6, 9] and len(TokenTail(ids, 6)) == 0


def test_block_table_rows_follow_the_sequence(ckpt):
    """runner._table_row: kept per sequence and extended in place; a replaced (admission,
    preemption) or shortened list is read afresh."""
    from qwen35.engine.sequence import Sequence

    runner = make(ckpt).engine.runner
    seq = Sequence("s", [1, 2, 3])
    for change in ([4, 5], [6], [7] * 40, None, [8], "replace", [9, 10], "shrink", [11]):
        if change == "replace":
            seq.block_ids = [20, 21, 22]
        elif change == "shrink":
            del seq.block_ids[1:]
        elif change is not None:
            seq.block_ids += change
        row = runner._table_row(seq)
        assert row.dtype == np.int32 and row.tolist() == seq.block_ids
    runner.remove_sequence("s")
    assert "s" not in runner._tables


def test_long_outputs_stay_exact(ckpt):
    """Sampling reads outputs through a TokenTail: penalties and min_tokens see every token."""
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, presence_penalty=1.5,
                        frequency_penalty=0.5, repetition_penalty=1.3, min_tokens=30)  # fmt: skip
    from qwen35.engine.sampler import SamplingRow, reference_sample

    llm = make(ckpt)
    out = llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    # the reference: the same logits (the model over the whole text) through reference_sample
    model = llm.engine.runner.model
    seq = [5, 6, 7]
    for tok in out:
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]
        row = SamplingRow(sp, prompt_token_ids=[5, 6, 7], output_token_ids=seq[3:],
                          eos_token_ids=llm.engine.eos_token_ids)  # fmt: skip
        assert reference_sample(logits, row)[0] == tok
        seq.append(tok)
