"""Engine invariants (issue 4): batched == alone, chunked prefill == whole, preempted == not,
block size does not matter, seeds reproduce, stop strings, n > 1, abort frees everything."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from qwen35.engine.llm_engine import LLM, PromptTooLongError
from qwen35.request import SamplingParams
from tiny import hf_torch_path, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine") / "dense"
    hf = save_checkpoint(d, moe=False, layout="vlm")
    return d, hf


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine") / "moe"
    hf = save_checkpoint(d, moe=True, layout="vlm", experts="per_expert")
    return d, hf


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def shared_prefix_workload(seed: int, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """n prompts, most starting with part of one 40-token prefix (prefix-cache hits), 1-29 own
    tokens each, and greedy params of 1-23 output tokens (ignore_eos)."""
    rng = random.Random(seed)
    base = [rng.randrange(2, 256) for _ in range(40)]
    ps = [base[: rng.randrange(0, 41)] + [rng.randrange(2, 256) for _ in range(rng.randrange(1, 30))]
          for _ in range(n)]  # fmt: skip
    sps = [SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0.0, ignore_eos=True)
           for _ in ps]  # fmt: skip
    return ps, sps


def make(d, **kw) -> LLM:
    kw.setdefault("dtype", "fp32")
    kw.setdefault("verbose", False)
    return LLM(str(d), **kw)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, exactly n, EOS a token like any other (as ignore_eos has
    it). min_new_tokens=n, used before, masks EOS out instead: a prompt whose greedy token is
    EOS then differs (tests/test_gpu.py's prompts do, on dense and MoE: its failure on the
    H200, and on the CPU engine alike)."""
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id = []  # no EOS: never stops, never masked
    gc.pad_token_id = 0  # (one unpadded row; transformers takes EOS's id for it otherwise)
    with hf_torch_path():  # the plain PyTorch reference, also where fla-core is installed
        out = hf.generate(
            torch.tensor([prompt]), generation_config=gc, max_new_tokens=n, do_sample=False
        )
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt) :].tolist()


def ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_batched_equals_alone_and_transformers(which, ckpt, moe_ckpt):
    d, hf = ckpt if which == "dense" else moe_ckpt
    ps = prompts(5, seed=1)
    llm = make(d, block_size=4)
    batched = ids(llm.generate(ps, GREEDY))
    alone = [ids(llm.generate([p], GREEDY))[0] for p in ps]
    assert batched == alone
    for p, got in zip(ps, batched, strict=True):
        assert got == hf_greedy(hf, p, GREEDY.max_tokens)


def test_chunked_prefill_equals_whole(ckpt):
    d, _ = ckpt
    ps = prompts(4, seed=2, lo=60, hi=150)
    whole = ids(make(d, max_num_batched_tokens=2048).generate(ps, GREEDY))
    chunked = ids(make(d, max_num_batched_tokens=24).generate(ps, GREEDY))
    assert whole == chunked


def test_block_size_does_not_change_output(ckpt):
    d, _ = ckpt
    ps = prompts(4, seed=3)
    outs = [ids(make(d, block_size=bs).generate(ps, GREEDY)) for bs in (1, 4, 16, 64)]
    assert all(o == outs[0] for o in outs)


def test_preempted_equals_uninterrupted(ckpt):
    d, _ = ckpt
    ps = prompts(6, seed=4, lo=30, hi=60)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = ids(make(d).generate(ps, params))
    # KV for ~2 sequences at a time: the scheduler must preempt and recompute
    llm = make(d, block_size=4, max_model_len=96, num_kv_blocks=48, enable_prefix_caching=False)
    sched = llm.engine.scheduler
    got = ids(llm.generate(ps, params))
    assert sched.num_preemptions > 0
    assert got == ref


def test_same_seed_same_sample(ckpt):
    d, _ = ckpt
    ps = prompts(3, seed=5)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    llm = make(d)
    a = ids(llm.generate(ps, sp))
    b = ids(llm.generate(ps[::-1], sp))[::-1]  # other batch order, same per-request seed
    assert a == b
    c = ids(llm.generate(ps, SamplingParams(**{**vars(sp), "seed": 99})))
    assert a != c


def test_n_greater_than_one(ckpt):
    d, _ = ckpt
    llm = make(d)
    out = llm.generate(
        [prompts(1, seed=6)[0]],
        SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
    )[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_stop_string_across_tokens_and_stream(ckpt):
    d, _ = ckpt
    llm = make(d)
    p = prompts(1, seed=8)[0]
    full = llm.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    text = full.outputs[0].text
    assert len(text) > 6
    toks = full.outputs[0].token_ids
    # a stop string that starts inside one token's text and ends inside a later one
    pieces = [llm.tokenizer.decode([t]) for t in toks]
    first = next(i for i, s in enumerate(pieces) if len(s) >= 1 and i + 2 < len(pieces))
    cut = len("".join(pieces[:first])) + max(0, len(pieces[first]) - 1)
    stop = text[cut : cut + len(pieces[first + 1]) + 2]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    out = llm.generate([p], sp)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    streamed = "".join(o.text for d_ in llm.stream(p, sp) for o in d_.outputs)
    assert streamed == out.text


def _token_texts(llm, toks) -> list[str]:
    """The text each generated token adds (as the engine streams it)."""
    from qwen35.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(llm.tokenizer)
    return [detok.add(t) for t in toks]


def test_stop_string_completed_by_the_last_token_is_a_stop(ckpt):
    """max_tokens reached by the token that completes a stop string: finish "stop" with that
    string (as vLLM), not "length"; the text as for any stop."""
    d, _ = ckpt
    llm = make(d)
    p = prompts(1, seed=10)[0]
    full = llm.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    text, pieces = full.outputs[0].text, _token_texts(llm, full.outputs[0].token_ids)
    ends = [len("".join(pieces[: k + 1])) for k in range(len(pieces))]
    k = next(k for k in range(len(pieces) - 1, 0, -1)
             if pieces[k] and text.find(pieces[k]) == ends[k] - len(pieces[k]))  # fmt: skip
    stop = pieces[k]
    for include in (False, True):
        sp = SamplingParams(max_tokens=k + 1, temperature=0.0, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)  # fmt: skip
        out = llm.generate([p], sp)[0].outputs[0]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == text[: ends[k] - (0 if include else len(stop))]
        assert len(out.token_ids) == k + 1


def test_a_stop_id_ends_the_text_without_its_own(ckpt):
    """A stop id stays in token_ids but its text is not the output's (vLLM excludes the
    stopping token from detokenization), unless include_stop_str_in_output; streamed alike."""
    d, _ = ckpt
    llm = make(d)
    p = prompts(1, seed=12)[0]
    full = llm.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    toks, pieces = full.outputs[0].token_ids, _token_texts(llm, full.outputs[0].token_ids)
    k = next(k for k in range(2, len(toks)) if pieces[k] and toks[k] not in toks[:k])

    def text_of(n: int) -> str:  # the first n tokens' text as a finished output has it
        from qwen35.tokenizer import IncrementalDetokenizer

        detok = IncrementalDetokenizer(llm.tokenizer)
        return "".join(detok.add(t) for t in toks[:n]) + detok.flush()

    for include in (False, True):
        sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                            stop_token_ids=[toks[k]], include_stop_str_in_output=include)  # fmt: skip
        out = llm.generate([p], sp)[0].outputs[0]
        assert (out.finish_reason, out.stop_reason) == ("stop", toks[k])
        assert out.token_ids == toks[: k + 1]
        assert out.text == text_of(k + 1 if include else k), include
        assert "".join(o.text for d_ in llm.stream(p, sp) for o in d_.outputs) == out.text


def test_min_tokens_holds_stop_strings_back(ckpt):
    """No stop string may end in the text of the first min_tokens tokens (as EOS and stop ids
    may not be among them; vLLM's rule): the first occurrence after them stops."""
    d, _ = ckpt
    llm = make(d)
    p = prompts(1, seed=11)[0]
    full = llm.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    text, pieces = full.outputs[0].text, _token_texts(llm, full.outputs[0].token_ids)
    # a character of the first m tokens' text that comes again later
    m, c, at = next((m, c, text.find(c, len("".join(pieces[:m]))))
                    for m in range(1, 10) for c in "".join(pieces[:m])
                    if text.find(c, len("".join(pieces[:m]))) != -1)  # fmt: skip
    base = dict(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[c])
    early = llm.generate([p], SamplingParams(**base))[0].outputs[0]
    assert early.finish_reason == "stop" and early.text == text[: text.index(c)]
    held = llm.generate([p], SamplingParams(**base, min_tokens=m))[0].outputs[0]
    assert (held.finish_reason, held.stop_reason) == ("stop", c)
    assert held.text == text[:at] and len(held.token_ids) > m


def test_logprobs_and_usage(ckpt):
    d, _ = ckpt
    llm = make(d)
    p = prompts(1, seed=9)[0]
    out = llm.generate(
        [p], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
    )[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5 and all(len(lp.top) == 3 for lp in lps)
    assert [lp.token_id for lp in lps] == out.outputs[0].token_ids
    assert out.usage == {
        "prompt_tokens": len(p),
        "completion_tokens": 5,
        "total_tokens": len(p) + 5,
    }


def test_abort_frees_everything(ckpt):
    d, _ = ckpt
    llm = make(d, enable_prefix_caching=False)
    eng = llm.engine
    for i, p in enumerate(prompts(4, seed=10)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    for i in range(4):
        eng.abort_request(f"r{i}")
    assert not eng.has_unfinished_requests()
    s = eng.get_stats()
    assert s["kv_blocks_used"] == 0 and s["state_slots_used"] == 0 and s["num_running"] == 0


def test_errors(ckpt):
    d, _ = ckpt
    llm = make(d, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="too many"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="temperature"):
        llm.generate([[5] * 4], SamplingParams(temperature=-1))


@pytest.mark.parametrize("which, quant", [("dense", None), ("moe", None), ("moe", "int4")])
def test_random_workload_equals_each_request_alone(which, quant, ckpt, moe_ckpt):
    """Everything that reshapes a step at once (fp32): shared prefixes hitting the prefix cache,
    a KV pool that forces preemption, a token budget that chunks prompts beside decode rows,
    uneven output lengths, up to 16 rows a step (the few-token MoE path, its int4 kernels).
    Each request's greedy tokens equal its run alone in a plain engine."""
    d, _ = ckpt if which == "dense" else moe_ckpt
    ps, sps = shared_prefix_workload(11, 14)
    kw = dict(block_size=4, quantization=quant)
    busy = make(d, max_num_seqs=16, max_num_batched_tokens=32, num_kv_blocks=48,
                max_model_len=96, **kw)  # fmt: skip
    got = ids(busy.generate(ps, sps))
    stats = busy.engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    plain = make(d, enable_prefix_caching=False, **kw)
    alone = [ids(plain.generate([p], sp))[0] for p, sp in zip(ps, sps, strict=True)]
    assert got == alone
    assert [len(t) for t in got] == [sp.max_tokens for sp in sps]
