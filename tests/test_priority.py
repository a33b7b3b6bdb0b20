"""Priority scheduling (vLLM's `--scheduling-policy priority` and request `priority`): the
engine admits waiting requests by (priority, arrival), its tokens are those of an FCFS engine,
an FCFS engine refuses a non-zero priority, and the server passes the field (completions, chat,
responses) or answers 400 naming it. The scheduler's own tests: tests/test_scheduler.py."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams, SamplingParamsError
from test_engine import make
from tiny import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("priority") / "m"
    save_checkpoint(d)
    return d


def _first_token_order(engine, prompts, priorities) -> tuple[list[str], dict[str, list[int]]]:
    for i, (p, prio) in enumerate(zip(prompts, priorities, strict=True)):
        sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, priority=prio)
        engine.add_request(f"r{i}", p, sp)
    order, tokens = [], {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id not in tokens:
                order.append(o.request_id)
                tokens[o.request_id] = []
            tokens[o.request_id] += o.outputs[0].token_ids
    return order, tokens


def test_engine_runs_requests_by_priority(ckpt):
    prompts = [[5 + i, 17, 99, 3, 42] for i in range(4)]
    llm = make(ckpt, max_num_seqs=1, scheduling_policy="priority")
    order, tokens = _first_token_order(llm.engine, prompts, [3, 0, -2, 0])
    assert order == ["r2", "r1", "r3", "r0"]
    fcfs = make(ckpt, max_num_seqs=1)
    order0, tokens0 = _first_token_order(fcfs.engine, prompts, [0, 0, 0, 0])
    assert order0 == ["r0", "r1", "r2", "r3"] and tokens0 == tokens  # same tokens, other order
    with pytest.raises(SamplingParamsError, match="--scheduling-policy priority") as e:
        fcfs.generate([prompts[0]], SamplingParams(max_tokens=2, priority=1))
    assert e.value.param == "priority" and not fcfs.engine.has_unfinished_requests()
    with pytest.raises(SamplingParamsError, match="priority must be an integer"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=2, priority=2**40))
    # LLM.generate's priority list (vLLM's): one per prompt, outputs in prompt order
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, greedy, priority=[3, 0, -2, 0])
    assert [o.outputs[0].token_ids for o in outs] == [tokens[f"r{i}"] for i in range(4)]
    with pytest.raises(Qwen35Error, match="one integer per prompt"):
        llm.generate(prompts, greedy, priority=[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from server_fakes import serving_tiny_engine

    yield from serving_tiny_engine(
        tmp_path_factory.mktemp("priority-served"), dtype="fp32", scheduling_policy="priority"
    )


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hello there"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/responses", {"input": "Hi"}),
])  # fmt: skip
def test_server_priority_field(served, path, body):
    srv, _, engine = served
    seen = []
    add, sched = engine.add_request, engine.scheduler.config
    engine.add_request = lambda rid, p, params, **kw: (
        seen.append(params.priority), add(rid, p, params, **kw))[1]
    body = {"model": "tiny", "temperature": 0, **body, "priority": -5}
    body["max_output_tokens" if path == "/v1/responses" else "max_tokens"] = 2
    try:
        r = httpx.post(srv.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert seen == [-5]
        bad = httpx.post(srv.url + path, json={**body, "priority": "high"}, timeout=60)
        assert bad.status_code == 400, bad.text
        # the same engine under FCFS (the default policy) refuses a priority, naming the flag
        engine.scheduler.config = dataclasses.replace(sched, scheduling_policy="fcfs")
        r = httpx.post(srv.url + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
        assert "--scheduling-policy priority" in r.json()["error"]["message"]
        assert httpx.post(srv.url + path, json={**body, "priority": 0}, timeout=60).status_code == 200
    finally:
        engine.add_request, engine.scheduler.config = add, sched
