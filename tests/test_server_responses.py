"""POST /v1/responses (OpenAI's Responses API) with the official `openai` client: on the
FakeEngine (canned replies: reasoning, tool calls, length) and once on the real engine. Every
response and stream event is validated against the openai package's own models."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from server_fakes import CALL, FakeEngine, serving, serving_tiny_engine

FN = {"type": "function", "name": "get_weather", "description": "Weather of a city",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]}}  # fmt: skip
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def serve():
    yield from serving()


def stream(client, **kw) -> list:
    events = list(client.responses.create(model="tiny", stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for e in events:
        EVENTS.validate_python(e.model_dump())
    return events


def test_text_and_reasoning(serve):
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there!")
    _, client = serve(eng)
    r = client.responses.create(model="tiny", instructions="Be brief.",
                                input=[{"role": "developer", "content": "Style: plain."},
                                       {"role": "user", "content": [
                                           {"type": "input_text", "text": "Hello"}]}],
                                max_output_tokens=50)  # fmt: skip
    Response.model_validate(r.model_dump())
    assert r.status == "completed" and r.output_text == "Hi there!"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Let me think."
    assert r.usage.output_tokens_details.reasoning_tokens == len(eng.tokenizer.encode("Let me think."))
    assert r.usage.output_tokens == len(eng.reply_ids) + 1 and r.usage.input_tokens > 0  # (+ EOS)
    prompt = eng.added[-1][1]
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nStyle: plain.<|im_end|>")
    assert "<|im_start|>user\nHello<|im_end|>" in prompt
    events = stream(client, input="Hello", max_output_tokens=50)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    think = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == "Hi there!" and think.strip() == "Let me think."
    final = events[-1].response
    assert final.output_text == "Hi there!" and final.usage.output_tokens == r.usage.output_tokens
    assert final.usage.output_tokens_details.reasoning_tokens == (
        r.usage.output_tokens_details.reasoning_tokens)  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True])
def test_function_calls_and_their_outputs(serve, streamed):
    eng = FakeEngine(reply="Need the weather.\n</think>\n\n" + CALL)
    _, client = serve(eng)
    kw = dict(input="Weather in Paris?", tools=[FN], max_output_tokens=80)
    if streamed:
        events = stream(client, **kw)
        r = events[-1].response
        args = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert json.loads(args[0].arguments) == {"city": "Paris"}
    else:
        r = client.responses.create(model="tiny", **kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"] and calls[0].call_id
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert "<tools>" in eng.added[-1][1]
    # the round trip: the call and its output go back as input items
    eng2 = FakeEngine(reply="Done.\n</think>\n\nIt is 21C.")
    eng.reply_ids = eng2.reply_ids
    r2 = client.responses.create(model="tiny", tools=[FN], max_output_tokens=40, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'},
    ])  # fmt: skip
    assert r2.output_text.strip() == "It is 21C."
    prompt = eng.added[-1][1]
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt


def test_length_thinking_off_and_formats(serve):
    eng = FakeEngine(reply="Hi there! How are you today?")
    _, client = serve(eng)
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=2,
                                reasoning={"effort": "none"})  # fmt: skip
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert eng.added[-1][1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    events = stream(client, input="Hi", max_output_tokens=2, reasoning={"effort": "none"})
    assert events[-1].type == "response.incomplete"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.responses.create(model="tiny", input="Hi", max_output_tokens=5, text={"format": {
        "type": "json_schema", "name": "obj", "schema": schema, "strict": True}})  # fmt: skip
    so = eng.added[-1][2].structured_outputs  # the constraint reached the engine
    assert (json.loads(so.json) if isinstance(so.json, str) else so.json) == schema


def test_bad_requests(serve):
    srv, _ = serve(FakeEngine())
    for body, param in [
        ({"input": [{"type": "web_search_call"}]}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input"),
    ]:
        r = httpx.post(srv.url + "/v1/responses", json={"model": "tiny", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_previous_response_id_continues_a_stored_conversation(serve):
    eng = FakeEngine(reply="Hi there!")
    srv, client = serve(eng, max_stored_responses=2)
    off = {"effort": "none"}
    r1 = client.responses.create(model="tiny", instructions="Be brief.", input="My name is Ana.",
                                 reasoning=off, max_output_tokens=20)  # fmt: skip
    r2 = client.responses.create(model="tiny", previous_response_id=r1.id, reasoning=off,
                                 input="What is my name?", max_output_tokens=20)  # fmt: skip
    assert r2.previous_response_id == r1.id
    prompt = eng.added[-1][1]
    assert "Be brief." not in prompt  # (instructions are per response, as OpenAI's)
    assert ("<|im_start|>user\nMy name is Ana.<|im_end|>\n<|im_start|>assistant\nHi there!"
            "<|im_end|>\n<|im_start|>user\nWhat is my name?<|im_end|>") in prompt  # fmt: skip
    # a third turn on top of the second: the whole chain
    client.responses.create(model="tiny", previous_response_id=r2.id, input="And again?",
                            reasoning=off, max_output_tokens=20)  # fmt: skip
    assert eng.added[-1][1].count("<|im_start|>user") == 3
    got = httpx.get(f"{srv.url}/v1/responses/{r2.id}").json()
    assert Response.model_validate(got).id == r2.id and got["output"][0]["type"] == "message"
    # at most 2 kept: r1 was dropped (r2 was used since)
    r = httpx.post(srv.url + "/v1/responses",
                   json={"input": "x", "previous_response_id": r1.id})  # fmt: skip
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    d = httpx.delete(f"{srv.url}/v1/responses/{r2.id}").json()
    assert d == {"id": r2.id, "object": "response.deleted", "deleted": True}
    assert httpx.get(f"{srv.url}/v1/responses/{r2.id}").status_code == 404
    nostore = client.responses.create(model="tiny", input="x", store=False, max_output_tokens=2)
    assert httpx.get(f"{srv.url}/v1/responses/{nostore.id}").status_code == 404
    streamed = stream(client, input="x", max_output_tokens=2)[-1].response
    assert httpx.get(f"{srv.url}/v1/responses/{streamed.id}").json()["id"] == streamed.id


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    yield from serving_tiny_engine(tmp_path_factory.mktemp("responses"))


def test_real_engine(real):
    _, client, engine = real
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=6,
                                extra_body={"ignore_eos": True})  # fmt: skip
    Response.model_validate(r.model_dump())
    assert r.usage.output_tokens == 6 and r.status == "incomplete"
    events = stream(client, input="Hi", max_output_tokens=6, temperature=0,
                    extra_body={"ignore_eos": True})  # fmt: skip
    assert events[-1].response.usage.output_tokens == 6
