"""Issue 11, engine side: no request can stop the engine or leave anything behind.

After every refused or failed request: the scheduler's integrity holds, nothing runs, waits or
holds a KV block or state slot, and a normal request gives the same tokens as on a fresh engine.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen35.engine.llm_engine import (
    LLM,
    EngineBrokenError,
    PromptTooLongError,
    RequestFailedError,
)
from qwen35.engine.sampler import Sampler
from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams, SamplingParamsError
from tiny import save_checkpoint

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 9, 100, 3, 77]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust") / "dense"
    save_checkpoint(d, moe=False, layout="vlm")
    return LLM(str(d), dtype="fp32", verbose=False, max_model_len=64, block_size=4)


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def assert_idle_and_working(llm, reference) -> None:
    eng = llm.engine
    eng.scheduler.check_integrity()
    assert not eng.has_unfinished_requests()
    assert not eng.request_tables(), eng.request_tables()
    s = eng.get_stats()
    assert (s["num_running"], s["num_waiting"], s["kv_blocks_used"], s["state_slots_used"]) == (
        0, 0, 0, 0,
    )  # fmt: skip
    assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == reference


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"top_p": 1e-46}, "top_p"),
        ({"repetition_penalty": math.nan, "top_p": 0.9}, "repetition_penalty"),
        ({"repetition_penalty": 1e-50, "top_p": 0.9}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"n": 33, "seed": 2**64 - 32}, "seed"),
        ({"logit_bias": {10**6: 5.0}}, "logit_bias"),  # not in the vocabulary
        ({"n": 2**63}, "n"),  # a MemoryError building 2**63 sequence ids before
    ],
)
def test_refused_params_register_nothing(llm, reference, kw, param):
    with pytest.raises(SamplingParamsError) as e:
        llm.engine.add_request("bad", PROMPT, SamplingParams(max_tokens=4, **kw))
    assert e.value.param == param
    assert_idle_and_working(llm, reference)


def test_prompt_too_long_without_max_tokens(llm, reference):
    eng = llm.engine
    for n in (64, 65, 200):  # no room left for one token
        with pytest.raises(PromptTooLongError, match="shorten the prompt") as e:
            eng.add_request("long", [5] * n, SamplingParams(max_tokens=None))
        assert e.value.max_tokens is None and e.value.prompt_tokens == n
    with pytest.raises(PromptTooLongError, match="lower max_tokens"):
        eng.add_request("long", [5] * 60, SamplingParams(max_tokens=5, n=3))
    assert_idle_and_working(llm, reference)
    # 63 prompt tokens leave room for exactly one; the caller's params are not modified
    sp = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    out = llm.generate([[5] * 63], sp)[0]
    assert len(out.outputs[0].token_ids) == 1 and sp.max_tokens is None


def test_failure_while_registering_is_undone(llm, reference, monkeypatch):
    eng = llm.engine
    add = eng.scheduler.add
    calls = []

    def flaky(seq):
        calls.append(seq.seq_id)
        if len(calls) == 3:
            raise RuntimeError("injected")
        add(seq)

    monkeypatch.setattr(eng.scheduler, "add", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        eng.add_request("r", PROMPT, SamplingParams(n=5, max_tokens=4))
    monkeypatch.undo()
    assert_idle_and_working(llm, reference)


def test_request_id_clash_with_a_sequence_id(llm, reference):
    eng = llm.engine
    eng.add_request("a", PROMPT, SamplingParams(n=2, max_tokens=2))
    with pytest.raises(Qwen35Error, match="clashes"):
        eng.add_request("a#1", PROMPT, SamplingParams(max_tokens=2))
    eng.abort_request("a")
    assert_idle_and_working(llm, reference)


def test_generate_params_must_match_prompts(llm, reference):
    with pytest.raises(Qwen35Error, match="3 prompts but 2 SamplingParams"):
        llm.generate([PROMPT] * 3, [GREEDY, GREEDY])
    # one refused prompt: none of the batch is queued
    with pytest.raises(PromptTooLongError):
        llm.generate([PROMPT, [5] * 100, PROMPT], GREEDY)
    with pytest.raises(Qwen35Error, match="got int"):  # (a TypeError from indexing it before)
        llm.generate(5, GREEDY)
    # each a bare TypeError from deep inside before ('int' / 'float' object is not iterable,
    # replace() should be called on dataclass instances)
    for prompts, params, match in (
        ({"prompt": 3}, GREEDY, "a prompt must be a text or a list of token ids, got int"),
        ([[1.5]], GREEDY, "prompt token ids must be a non-empty list of ints"),
        ([[True, 5]], GREEDY, "prompt token ids must be a non-empty list of ints"),
        ([PROMPT], [{"max_tokens": 2}], "params must be a SamplingParams, got dict"),
    ):
        with pytest.raises(Qwen35Error, match=match):
            llm.generate(prompts, params)
    with pytest.raises(Qwen35Error, match="a prompt must be a text"):
        next(llm.stream(3, GREEDY))
    with pytest.raises(Qwen35Error, match="messages must be a list of message objects"):
        llm.chat(None, GREEDY)
    assert_idle_and_working(llm, reference)


class _FailingSampler(Sampler):
    """Raises on every call that includes a row with seed 666 (a stand-in for any per-row bug)."""

    def __call__(self, logits, rows):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("injected sampler failure")
        return super().__call__(logits, rows)


def test_a_failing_row_fails_only_its_request(llm, reference, monkeypatch):
    eng = llm.engine
    monkeypatch.setattr(eng.runner, "sampler", _FailingSampler())
    good = [[7, 8, 9, 10], PROMPT]
    alone = [o.outputs[0].token_ids for o in llm.generate(good, GREEDY)]
    bad = SamplingParams(max_tokens=6, seed=666, n=2, ignore_eos=True)
    with pytest.raises(RequestFailedError, match="injected sampler failure") as e:
        llm.generate([good[0], PROMPT, good[1]], [GREEDY, bad, GREEDY])
    outs = e.value.outputs
    assert [o.error is not None for o in outs] == [False, True, False]
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == alone
    assert outs[1].finished and {o.finish_reason for o in outs[1].outputs} <= {"error", "abort"}
    assert "error" in {o.finish_reason for o in outs[1].outputs}
    assert eng.get_stats()["request_errors_total"] >= 1
    monkeypatch.undo()
    assert_idle_and_working(llm, reference)


def test_stream_raises_for_its_failed_request(llm, reference, monkeypatch):
    monkeypatch.setattr(llm.engine.runner, "sampler", _FailingSampler())
    with pytest.raises(RequestFailedError):
        list(llm.stream(PROMPT, SamplingParams(max_tokens=4, seed=666)))
    monkeypatch.undo()
    assert_idle_and_working(llm, reference)


class _FlakyModel(torch.nn.Module):
    """The real model, but its forward raises while `fail` > 0 (either entry the runner uses:
    `forward`, or `forward_hidden` where the head screen takes the step)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.fail = model, 0

    def _maybe_fail(self):
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError("injected forward failure")

    def forward(self, *args, **kwargs):
        self._maybe_fail()
        return self.inner(*args, **kwargs)

    def forward_hidden(self, *args, **kwargs):
        self._maybe_fail()
        return self.inner.forward_hidden(*args, **kwargs)

    def final_norm(self, *args, **kwargs):
        return self.inner.final_norm(*args, **kwargs)

    def head_logits(self, *args, **kwargs):
        return self.inner.head_logits(*args, **kwargs)


def test_a_failed_forward_fails_its_step_and_the_engine_goes_on(llm, reference, monkeypatch):
    eng = llm.engine
    flaky = _FlakyModel(eng.runner.model)
    monkeypatch.setattr(eng.runner, "model", flaky)
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    eng.add_request("a", PROMPT, long)
    eng.add_request("b", [3, 1, 4, 1, 5], SamplingParams(n=2, max_tokens=20, ignore_eos=True))
    for _ in range(3):  # prefill, then decode steps: a has blocks and a slot
        eng.step()
    flaky.fail = 1
    outs = {o.request_id: o for o in eng.step()}
    assert set(outs) == {"a", "b"} and all(o.finished and o.error for o in outs.values())
    assert all(o.finish_reason == "error" for r in outs.values() for o in r.outputs)
    assert_idle_and_working(llm, reference)
    # a step that fails MAX_FAILED_STEPS times in a row is the device or model, not a request
    flaky.fail = 3
    for i in range(3):
        eng.add_request(f"c{i}", PROMPT, GREEDY)
        if i < 2:
            assert eng.step()[0].error
    with pytest.raises(EngineBrokenError, match="3 times in a row"):
        eng.step()
    monkeypatch.undo()
    assert_idle_and_working(llm, reference)


def test_logit_bias_steers_generation(llm):
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=5, temperature=0.0, logit_bias={123: 100.0})
    )[0].outputs[0]
    assert out.token_ids == [123] * 5
    ban = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))[0]
    first = ban.outputs[0].token_ids[0]
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=1, temperature=0.0, logit_bias={first: -100.0})
    )[0].outputs[0]
    assert out.token_ids[0] != first


def test_checkpoint_template_keeps_its_thinking_default(tmp_path):
    import shutil
    from pathlib import Path

    from qwen35.chat_format import ChatFormatError, default_thinking_for

    save_checkpoint(tmp_path, moe=False, layout="vlm")
    fixture = Path(__file__).parent / "fixtures" / "qwen3_5_chat_template.jinja"  # thinks
    shutil.copy(fixture, tmp_path / "chat_template.jinja")
    llm = LLM(
        str(tmp_path), dtype="fp32", verbose=False, max_model_len=64, max_memory="64MiB",
        text_only=True,  # no vision encoder: image parts are refused
    )  # fmt: skip
    assert default_thinking_for(llm.engine.config) is False  # tiny: sized like the 0.8B
    assert llm.engine.default_thinking is True  # but its template says otherwise
    user = [{"role": "user", "content": "hi"}]
    assert llm.engine.chat_template.render(user).endswith("<|im_start|>assistant\n<think>\n")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ChatFormatError, match="vision encoder"):
        llm.chat([{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}])
    assert not llm.engine.has_unfinished_requests()


def test_each_sequence_reports_its_finish_once(llm):
    # n=3 samples that stop at different steps (half the vocabulary stops them)
    sp = SamplingParams(n=3, max_tokens=30, temperature=1.0, seed=3,
                        stop_token_ids=list(range(0, 256, 2)))  # fmt: skip
    finished: set[int] = set()
    for delta in llm.stream(PROMPT, sp):  # they finish at different steps (seeded)
        for o in delta.outputs:
            assert o.index not in finished, "an output after its sequence finished"
            if o.finish_reason is not None:
                finished.add(o.index)
    assert finished == {0, 1, 2}


def _random_params(rng) -> dict:
    odd = [math.nan, math.inf, -math.inf, 1e-46, 1e-50, 1e300, -1e-46, 0.0, -1, 2**64, True]
    kw: dict = {}
    ranges = {"temperature": (0, 2), "top_p": (0.01, 1), "min_p": (0, 0.3),
              "repetition_penalty": (0.5, 2), "presence_penalty": (-2, 2),
              "frequency_penalty": (-2, 2)}  # fmt: skip
    for name, (lo, hi) in ranges.items():
        r = rng.random()
        if r < 0.08:
            kw[name] = rng.choice(odd)
        elif r < 0.6:
            kw[name] = rng.uniform(lo, hi)
    if rng.random() < 0.3:
        kw["top_k"] = rng.choice([0, -1, 1, 5, 10**9, -5])
    if rng.random() < 0.3:
        kw["n"] = rng.choice([1, 2, 3, 0, -1])
    if rng.random() < 0.3:
        kw["seed"] = rng.choice([0, 7, -1, 2**64 - 1, 2**64, -(2**63) - 1, 2**64 - 2])
    if rng.random() < 0.2:
        kw["logit_bias"] = {
            rng.choice([0, 5, 10**6, -1]): rng.choice([1.0, -100, 100, 1e9, math.nan])
        }
    if rng.random() < 0.2:
        kw["min_tokens"] = rng.choice([0, 2, -1])
    if rng.random() < 0.2:
        kw["logprobs"] = rng.choice([None, 0, 3, 21, -1])
    if rng.random() < 0.2:
        kw["max_tokens"] = rng.choice([1, 0, 10**9])
    kw.setdefault("max_tokens", 3)
    return kw


def test_fuzz_random_sampling_values_never_break_the_engine(llm, reference):
    import random

    eng, rng = llm.engine, random.Random(11)
    accepted = refused = 0
    for i in range(200):
        kw = _random_params(rng)
        prompt = rng.choice([PROMPT, PROMPT, [3, 4], [1] * 70, [10**7]])
        try:
            eng.add_request(f"f{i}", prompt, SamplingParams(**kw))
            accepted += 1
        except Qwen35Error:  # SamplingParamsError, PromptTooLongError, bad prompt ids
            refused += 1
        if i % 20 == 19:  # run what was accepted, every row its own mix
            while eng.has_unfinished_requests():
                for out in eng.step():
                    assert out.error is None, out.error
            eng.scheduler.check_integrity()
    assert accepted > 20 and refused > 60
    assert_idle_and_working(llm, reference)


@pytest.mark.parametrize("spec", [{}, {"num_speculative_tokens": 2},
                                  {"num_speculative_tokens": 3, "speculative_method": "ngram"}])
def test_nothing_per_request_is_left_behind(tmp_path, spec):
    """A random mix of requests (grammars, n > 1, seeds, logprobs, penalties, aborts at any step,
    preemption in a small KV pool; with and without drafts) leaves every per-request table of the
    engine empty once idle (LLMEngine.request_tables() is {}): a long-running server keeps nothing of
    the requests it served."""
    import random

    from qwen35.request import StructuredOutputs
    from server_fakes import build_tiny_engine

    eng = build_tiny_engine(tmp_path / "tiny", num_kv_blocks=24, max_num_seqs=6,
                             max_model_len=256, **spec)
    rng = random.Random(7)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    live = []
    for i in range(60):
        kw = dict(max_tokens=rng.randrange(1, 40), ignore_eos=rng.random() < 0.5,
                  temperature=rng.choice([0.0, 0.8]), seed=i, n=rng.choice([1, 1, 2]),
                  logprobs=rng.choice([None, 2]), presence_penalty=rng.choice([0.0, 0.5]))  # fmt: skip
        if rng.random() < 0.3:
            kw["structured_outputs"] = rng.choice(
                [StructuredOutputs(json=schema), StructuredOutputs(regex="[0-9]{2,6}")])
        prompt = [rng.randrange(100, 5000) for _ in range(rng.randrange(1, 120))]
        eng.add_request(f"r{i}", prompt, SamplingParams(**kw))
        live.append(f"r{i}")
        for _ in range(rng.randrange(0, 4)):
            eng.step()
        if rng.random() < 0.25:
            eng.abort_request(live.pop(rng.randrange(len(live))))
    while eng.has_unfinished_requests():
        eng.step()
    stats = eng.get_stats()
    assert stats["num_preemptions"] > 0  # (the pool is small enough to preempt)
    assert not eng.request_tables(), eng.request_tables()
    eng.shutdown()
