"""Paced prompt chunks while sequences decode (engine/prefill_pacer.py, `max_decode_step_ms`):
the pacer's cap from measured steps, the engine's schedule under it, and results unchanged."""

from __future__ import annotations

import random

import pytest

from qwen35.engine.config import EngineConfig
from qwen35.engine.prefill_pacer import MIN_PREFILL_CAP, PrefillPacer
from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams
from tiny import save_checkpoint


def test_cap_follows_the_measured_rate():
    p = PrefillPacer(1000)
    assert p.cap() == MIN_PREFILL_CAP  # nothing measured yet: the floor, whose step is timed
    p.record(64, 0.5)  # too few prompt tokens to say anything: ignored
    assert p.cap() == MIN_PREFILL_CAP
    p.record(2048, 2.0)  # 1,024 tokens a second
    assert p.cap() == 1024
    p.record(100, 10.0)  # too few prompt tokens to say anything: ignored
    p.record(0, 0.5)
    assert p.cap() == 1024
    p.record(256, 1.0)  # smoothed: 0.5 x 256 + 0.5 x 1,024
    assert p.cap() == 640
    p.rate = 600.0
    assert p.cap() == 576  # on the 64-token grid, below the target
    p.rate = 10.0
    assert p.cap() == MIN_PREFILL_CAP  # never below what pays for a step
    assert PrefillPacer(0).cap() == 0
    off = PrefillPacer(0)
    off.record(4096, 1.0)
    assert off.cap() == 0
    with pytest.raises(ValueError, match="max_decode_step_ms"):
        PrefillPacer(-1)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "fast", True])
def test_config_refuses_what_is_not_a_duration(bad):
    with pytest.raises(Qwen35Error, match="max_decode_step_ms must be a number"):
        EngineConfig.create("m", max_decode_step_ms=bad).validate()
    EngineConfig.create("m", max_decode_step_ms=250).validate()
    EngineConfig.create("m", max_decode_step_ms=None).validate()


def test_serve_paces_by_default_and_offline_does_not(ckpt, monkeypatch):
    from qwen35.cli import main
    from qwen35.commands import serve

    class Built(BaseException):  # stops `serve` where it would build its engine
        pass

    seen = []

    def build(args, **kw):
        seen.append(EngineConfig.from_cli(args, **kw).scheduler.max_decode_step_ms)
        raise Built

    monkeypatch.setattr(serve, "engine_on_its_thread", build)
    for flags in ([], ["--max-decode-step-ms", "250"], ["--max-decode-step-ms", "0"]):
        with pytest.raises(Built):
            main(["serve", "--model", str(ckpt), "--port", "0", *flags])
    assert seen == [serve.SERVE_DECODE_STEP_MS, 250, 0]
    assert serve.SERVE_DECODE_STEP_MS > 0
    assert EngineConfig.create("m").scheduler.max_decode_step_ms is None  # LLM: off


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("pacer") / "dense"
    save_checkpoint(d, moe=False)
    return d


def run(engine, cap_rate: float | None, long_prompt: list[int], streams: list[list[int]]):
    """streams decode; then long_prompt arrives. -> (every request's tokens, the long prompt's
    chunks (start, n), whether every stream got a token in every step of its prefill)."""
    if cap_rate is not None:  # a fixed rate: the cap does not depend on this machine's timing
        engine.pacer.rate = cap_rate
        engine.pacer.record = lambda *a: None
    schedule, chunks = engine.scheduler.schedule, []

    def watch(cap=0, short_first=False):
        out = schedule(cap, short_first)
        chunks.extend((s.start, s.num_new_tokens) for s in out.scheduled
                      if s.seq.seq_id.startswith("long") and not s.is_decode)  # fmt: skip
        return out

    engine.scheduler.schedule = watch
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(streams):
        engine.add_request(f"s{i}", p, sp)
    toks: dict[str, list[int]] = {}

    def step():
        outs = engine.step()
        for o in outs:
            toks.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        return {o.request_id for o in outs if o.outputs[0].token_ids}

    while len(toks) < len(streams):
        step()
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=4, temperature=0.0))
    steady = True
    while "long" not in toks:
        got = step()
        steady &= all(f"s{i}" in got for i in range(len(streams)))
    while engine.has_unfinished_requests():
        step()
    return toks, chunks, steady


def test_paced_engine_keeps_streams_going_and_gives_the_same_tokens(ckpt):
    from qwen35.engine.llm_engine import LLMEngine

    rng = random.Random(5)
    streams = [[rng.randrange(2, 256) for _ in range(rng.randrange(5, 30))] for _ in range(2)]
    long_prompt = [rng.randrange(2, 256) for _ in range(700)]
    kw = dict(dtype="fp32", verbose=False, max_num_batched_tokens=2048, max_model_len=1024,
              enable_prefix_caching=False)  # fmt: skip
    whole = LLMEngine(str(ckpt), **kw)  # LLMEngine's default: no pacing
    paced = LLMEngine(str(ckpt), max_decode_step_ms=1000, **kw)
    ref, ref_chunks, _ = run(whole, None, long_prompt, streams)
    assert ref_chunks == [(0, 700)]
    got, chunks, steady = run(paced, 150.0, long_prompt, streams)  # cap: 128 tokens a step
    assert [n for _, n in chunks] == [128] * 5 + [60]
    assert steady, "a stream waited a step while the prompt prefilled"
    assert got == ref


@pytest.mark.parametrize("queued", [0, 1])
def test_a_short_request_starts_beside_a_long_prompt(ckpt, queued):
    """Paced (as under `serve`), a short prompt that arrives while a long one prefills is taken
    whole in the next step, also past a long prompt queued behind the first (`queued`);
    unpaced, it waits for the long prompts' chunks. Same tokens."""
    from qwen35.engine.llm_engine import LLMEngine

    rng = random.Random(7)
    long_prompt = [rng.randrange(2, 256) for _ in range(900)]
    second = [rng.randrange(2, 256) for _ in range(600)]
    short = [rng.randrange(2, 256) for _ in range(20)]
    kw = dict(dtype="fp32", verbose=False, max_num_batched_tokens=256, max_model_len=1024,
              enable_prefix_caching=False)  # fmt: skip
    got = {}
    for paced in (False, True):
        engine = LLMEngine(str(ckpt), max_decode_step_ms=1000 if paced else 0, **kw)
        sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        engine.add_request("long", long_prompt, sp)
        engine.step()  # its first chunk
        if queued:
            engine.add_request("second", second, sp)
        engine.add_request("short", short, sp)
        order, toks = [], {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.outputs[0].token_ids and o.request_id not in toks:
                    order.append(o.request_id)
                toks.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        got[paced] = toks
        assert order.index("short") == (0 if paced else len(order) - 1), order
    assert got[True] == got[False]


def test_the_first_paced_step_is_the_floor_until_a_rate_is_measured(ckpt):
    """At a server's start the streams' own short prompts time nothing (under 128 tokens): a
    long prompt beside them starts with one floor-sized chunk, whose time sets the rate, rather
    than a whole budget (seconds on a CPU)."""
    from qwen35.engine.llm_engine import LLMEngine

    rng = random.Random(9)
    streams = [[rng.randrange(2, 256) for _ in range(12)]]
    long_prompt = [rng.randrange(2, 256) for _ in range(700)]
    engine = LLMEngine(str(ckpt), dtype="fp32", verbose=False, max_num_batched_tokens=2048,
                       max_model_len=1024, enable_prefix_caching=False, max_decode_step_ms=1000)  # fmt: skip
    _, chunks, _ = run(engine, None, long_prompt, streams)
    assert engine.pacer.rate is not None
    assert chunks[0] == (0, MIN_PREFILL_CAP) and sum(n for _, n in chunks) == 700
