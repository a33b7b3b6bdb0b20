"""vLLM's thinking_token_budget: a reply still inside the think block its prompt opened gets
the end-of-think token after exactly that many tokens. The sampler against its plain reference,
the engine (the tokens before the budget equal an unbudgeted run's; the same with MTP drafts and
multi-step decoding; prompts that do not open a think block are untouched), and the servers'
fields (chat's thinking_token_budget, Anthropic's thinking.budget_tokens)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen35.engine.sampler import Sampler, SamplingRow, reference_sample, thinking_budget_due
from qwen35.request import SamplingParams, SamplingParamsError
from test_engine import make
from tiny import VOCAB_REAL, save_checkpoint

END = 7


def test_sampler_forces_the_end_at_the_budget_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    budget = dict(thinking_token_budget=2, think_end_token_id=END)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, **budget), output_token_ids=[1, 2]),
        SamplingRow(SamplingParams(temperature=0.9, seed=1, top_k=5, **budget),
                    output_token_ids=[1, 2], generator=torch.Generator().manual_seed(1)),
        SamplingRow(SamplingParams(temperature=0.0, **budget), output_token_ids=[1]),  # before
        SamplingRow(SamplingParams(temperature=0.0, **budget), output_token_ids=[END, 2]),  # closed
        SamplingRow(SamplingParams(temperature=0.0, thinking_token_budget=2),  # not thinking
                    output_token_ids=[1, 2]),
        # allowed ids without the end token: the budget still closes the block
        SamplingRow(SamplingParams(temperature=0.0, allowed_token_ids=[3], **budget),
                    output_token_ids=[4, 5]),
    ]  # fmt: skip
    assert [thinking_budget_due(r) for r in rows] == [True, True, False, False, False, True]
    logits[:, END] = -50.0  # the model itself would never close it
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == out.token_ids[1] == out.token_ids[5] == END
    assert END not in out.token_ids[2:5] and not out.errors
    for i, r in enumerate(rows):
        r = dataclasses.replace(r, generator=torch.Generator().manual_seed(1)) if i == 1 else r
        assert reference_sample(logits[i], r)[0] == out.token_ids[i]


def test_refused_when_negative():
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(thinking_token_budget=-1).validate()
    assert e.value.param == "thinking_token_budget"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget") / "m"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, layout="vlm", mtp=True)
    return d


def _run(llm, prompt, budget=None, **kw):
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                        thinking_token_budget=budget, **kw)  # fmt: skip
    return llm.generate([prompt], sp)[0].outputs[0].token_ids


@pytest.mark.parametrize("engine_kw", [{}, {"num_speculative_tokens": 2},
                                       {"num_scheduler_steps": 4}], ids=["plain", "mtp", "steps"])
def test_engine_closes_the_think_block_at_the_budget(ckpt, engine_kw):
    llm = make(ckpt, **engine_kw)
    if "num_speculative_tokens" in engine_kw:
        llm.engine.runner.spec.backoff = False  # (draft every step)
    end = llm.tokenizer.token_to_id("</think>")
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    thinking = llm.tokenizer.encode(llm.engine.chat_template.render(msgs, enable_thinking=True))
    free = _run(make(ckpt), thinking)
    assert end not in free[:5]  # (random weights: the model does not close it by itself)
    for budget in (0, 1, 4, 6):
        got = _run(llm, thinking, budget)
        assert got[:budget] == free[:budget] and got[budget] == end, budget
    if "num_speculative_tokens" in engine_kw:  # drafts of the free run (the one at the budget
        spec = llm.engine.runner.spec  # rejected) and of the budgeted run (all accepted)
        want = _run(make(ckpt), thinking, 4)
        for reply in (free, want):
            full = thinking + reply
            spec.draft_override = lambda seq, pos, full=full: full[pos] if pos < len(full) else None
            before = spec.stats.accepted
            assert _run(llm, thinking, 4) == want
            assert spec.stats.accepted > before
        spec.draft_override = None
    seeded = dict(temperature=0.8, seed=3)
    a = llm.generate([thinking], SamplingParams(max_tokens=8, thinking_token_budget=3,
                                                ignore_eos=True, **seeded))[0]  # fmt: skip
    assert a.outputs[0].token_ids[3] == end
    # a prompt that does not open a think block (thinking off, a plain prompt): untouched
    off = llm.tokenizer.encode(llm.engine.chat_template.render(msgs, enable_thinking=False))
    for prompt in (off, [5, 17, 99, 3]):
        assert _run(llm, prompt, 2) == _run(make(ckpt), prompt)


def test_servers_fields(ckpt):
    import anthropic
    import httpx

    from qwen35.server.app import ServerConfig, create_app
    from server_fakes import ServerThread

    llm = make(ckpt)
    srv = ServerThread(create_app(llm.engine, ServerConfig(served_model_name="tiny")))
    try:
        tok = llm.tokenizer
        msgs = [{"role": "user", "content": "Why is the sky blue?"}]
        body = {"messages": msgs, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                "chat_template_kwargs": {"enable_thinking": True}}  # fmt: skip
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={**body, "thinking_token_budget": 3}).json()  # fmt: skip
        m = r["choices"][0]["message"]
        free = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json=body).json()
        # the reasoning is the free run's first three tokens; the answer follows the </think>
        first3 = tok.decode(tok.encode(free["choices"][0]["message"]["reasoning_content"])[:3])
        assert m["reasoning_content"].strip() == first3.strip() and first3.strip()
        assert r["usage"]["completion_tokens"] == 10
        c = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
        out = c.messages.create(model="tiny", max_tokens=10, messages=msgs,
                                thinking={"type": "enabled", "budget_tokens": 3},
                                extra_body={"temperature": 0})  # fmt: skip
        assert out.content[0].type == "thinking" and out.content[0].thinking == m[
            "reasoning_content"]
        # with a response_format: free until the forced </think>, then the JSON constraint
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            **body, "max_tokens": 24, "thinking_token_budget": 2, "response_format": fmt,
            "ignore_eos": False}).json()  # fmt: skip
        m = r["choices"][0]["message"]
        assert m["reasoning_content"].strip() == tok.decode(
            tok.encode(free["choices"][0]["message"]["reasoning_content"])[:2]).strip()
        assert m["content"].lstrip().startswith("{"), m
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={**body, "thinking_token_budget": -2})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget"
    finally:
        srv.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_budgets_batched_equal_alone(tmp_path, seed):
    """Requests with random budgets (prompts that open a think block or not, greedy or seeded,
    n, stop ids, min_tokens) arriving between steps of engines with MTP or n-gram drafts,
    multi-step rounds or neither, prefix caching and preemption about: every output closes its
    think block at its budget, and equals its run alone in a plain engine."""
    import random

    from test_fuzz_workloads import _drive, _outs

    rng = random.Random(seed)
    d = tmp_path / "m"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, layout="vlm", mtp=True, seed=seed,
                    dtype=torch.float32)  # fmt: skip
    forced = 0  # outputs checked closing at their budget
    for mode in ("mtp", "ngram", "steps", "plain"):
        bs = rng.choice([4, 8, 16])
        kw = dict(dtype="fp32", verbose=False, block_size=bs, max_model_len=160,
                  max_num_seqs=rng.choice([2, 4, 16]), max_num_batched_tokens=rng.choice([8, 32, 256]),
                  enable_prefix_caching=rng.random() < 0.7)  # fmt: skip
        if rng.random() < 0.5:
            kw["num_kv_blocks"] = -(-160 // bs) + rng.randrange(1, 20)
        extra = {"mtp": dict(num_speculative_tokens=2), "steps": dict(num_scheduler_steps=3),
                 "ngram": dict(num_speculative_tokens=2, speculative_method="ngram"),
                 "plain": {}}[mode]  # fmt: skip
        llm = make(d, **kw, **extra)
        if mode == "mtp":
            llm.engine.runner.spec.backoff = False
        start, end = (llm.tokenizer.token_to_id(t) for t in ("<think>", "</think>"))

        def prompt(start=start):
            p = [rng.randrange(2, 5000) for _ in range(rng.randrange(3, 40))]
            return p + [start, 198] if rng.random() < 0.8 else p  # (198: "\n")

        def params():
            kw2 = dict(max_tokens=rng.randrange(1, 20), ignore_eos=True, n=rng.choice([1, 1, 2]),
                       thinking_token_budget=rng.randrange(0, 12))  # fmt: skip
            if rng.random() < 0.5:
                kw2.update(temperature=0.8, seed=rng.randrange(1 << 20))
            else:
                kw2["temperature"] = 0.0
            if rng.random() < 0.2:
                kw2["min_tokens"] = rng.randrange(0, 6)
            return SamplingParams(**kw2)

        reqs, done, _ = _drive(llm.engine, rng, rng.randrange(4, 12), lambda: (prompt(), params()),
                               0.05)  # fmt: skip
        fresh = make(d, **{**kw, "enable_prefix_caching": False})
        for rid, out in done.items():
            p, sp = reqs[rid]
            b = sp.thinking_token_budget
            for c in out.outputs:
                toks = list(c.token_ids)
                if p[-2:] == [start, 198] and len(toks) > b and end not in toks[:b]:
                    assert toks[b] == end, (rid, mode, b, toks)
                    forced += 1
            assert _outs(out) == _outs(fresh.generate([p], sp)[0]), (rid, mode, kw)
    assert forced >= 5
