"""Ollama's API (POST /api/chat, /api/generate, /api/show, GET /api/tags, /api/ps, /api/version:
server/serving_ollama.py) driven by the official `ollama` client: the request renders the prompt
the equivalent chat request renders, options become the sampling parameters, the reply's
thinking / content / tool calls and counts, streams (newline-delimited JSON) == the whole reply,
errors as `{"error": ...}` with the status. FakeEngine replies are canned (tests/server_fakes.py);
a real tiny engine runs the rest."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest

from server_fakes import CALL, TOOLS, FakeEngine, serving, serving_tiny_engine

ollama = pytest.importorskip("ollama", reason="the ollama client drives these tests")


@pytest.fixture
def serve():
    yield from serving()


def client(srv, key: str | None = None) -> ollama.Client:
    headers = {"authorization": f"Bearer {key}"} if key else None
    return ollama.Client(host=srv.url, headers=headers)


SYSTEM_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_chat_reply_options_and_prompt(serve):
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there!")
    srv, _ = serve(eng)
    c = client(srv)
    r = c.chat(model="tiny", messages=SYSTEM_USER, options={
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "repeat_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "seed": 7, "stop": ["zz"],
        "num_predict": 50, "num_ctx": 4096, "mirostat": 0})  # fmt: skip
    assert r.message.role == "assistant" and r.message.thinking.strip() == "Let me think."
    assert r.message.content.strip() == "Hi there!" and r.done and r.done_reason == "stop"
    want = eng.chat_template.render(SYSTEM_USER)
    assert eng.added[-1][1] == want
    p = eng.added[-1][2]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
        0.5, 0.9, 5, 0.05, 1.1)  # fmt: skip
    assert (p.presence_penalty, p.frequency_penalty, p.seed, p.stop, p.max_tokens) == (
        0.5, 0.25, 7, ["zz"], 50)  # fmt: skip
    assert r.prompt_eval_count == len(eng.tokenizer.encode(want))
    assert r.eval_count == len(eng.reply_ids) + 1  # (and the EOS)
    assert r.total_duration >= r.eval_duration > 0 and r.load_duration == 0
    # think false: the prompt closes the think block; num_predict -1: up to the context
    eng.reply_ids = eng.tokenizer.encode("Hi there!")
    r = c.chat(model="tiny", messages=SYSTEM_USER, think=False, options={"num_predict": -1})
    assert eng.added[-1][1].endswith("<think>\n\n</think>\n\n")
    assert r.message.content == "Hi there!" and not r.message.thinking
    room = eng.max_model_len - len(eng.tokenizer.encode(eng.added[-1][1]))
    assert eng.added[-1][2].max_tokens == room
    c.chat(model="tiny", messages=SYSTEM_USER, think=False, options={"num_predict": 100_000})
    assert eng.added[-1][2].max_tokens == room  # (a cap: cut to what the context leaves)


def test_stream_equals_the_whole_reply(serve):
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there, friend!")
    srv, _ = serve(eng)
    c = client(srv)
    whole = c.chat(model="tiny", messages=SYSTEM_USER)
    parts = list(c.chat(model="tiny", messages=SYSTEM_USER, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert "".join(p.message.thinking or "" for p in parts) == whole.message.thinking
    assert (parts[-1].eval_count, parts[-1].prompt_eval_count, parts[-1].done_reason) == (
        whole.eval_count, whole.prompt_eval_count, "stop")  # fmt: skip
    r = httpx.post(srv.url + "/api/chat", json={"model": "tiny", "messages": SYSTEM_USER})
    assert r.headers["content-type"].startswith("application/x-ndjson")  # (stream: the default)
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1]["done"] is True and "[DONE]" not in r.text
    gen = list(c.generate(model="tiny", prompt="Hi!", system="Be brief.", stream=True))
    assert "".join(p.response for p in gen) == whole.message.content and gen[-1].done


def test_tools_and_a_conversation_with_calls(serve):
    """Ollama's tool calls (arguments as objects) both ways: a reply's call, and an earlier
    call and its result in the conversation render as the chat endpoint renders them."""
    eng = FakeEngine(reply=CALL)
    srv, _ = serve(eng)
    c = client(srv)
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "thinking": "Call the tool.", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"},
            {"role": "user", "content": "And Rome?"}]  # fmt: skip
    # (raw JSON: the client's Tool model would reorder the schema's keys in the prompt)
    httpx.post(srv.url + "/api/chat", json={"model": "tiny", "messages": msgs, "tools": TOOLS,
                                            "think": False, "stream": False})  # fmt: skip
    chat = [msgs[0],
            {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
             "tool_calls": [{"id": "x", "type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": '{"temp": 21}'}, msgs[3]]  # fmt: skip
    assert eng.added[-1][1] == eng.chat_template.render(chat, tools=TOOLS, enable_thinking=False)
    r = c.chat(model="tiny", messages=msgs, tools=TOOLS, think=False)
    (call,) = r.message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    streamed = [p for p in c.chat(model="tiny", messages=msgs, tools=TOOLS, think=False,
                                  stream=True) if p.message.tool_calls]  # fmt: skip
    assert [dict(x.function.arguments) for p in streamed for x in p.message.tool_calls] == [
        {"city": "Paris"}]


def test_generate_and_the_model_endpoints(serve):
    eng = FakeEngine(reply="Hi there!", default_thinking=False)
    srv, _ = serve(eng)
    c = client(srv)
    r = c.generate(model="tiny", prompt="Hi!", system="Be brief.", format="json")
    assert r.response == "Hi there!" and r.done
    assert eng.added[-1][1] == eng.chat_template.render(SYSTEM_USER)
    assert eng.added[-1][2].structured_outputs is not None  # format json: constrained
    assert c.generate(model="tiny:latest").done_reason == "load"  # (empty: loads the model)
    r = httpx.post(srv.url + "/api/chat", json={"model": "tiny", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["message"]["content"] == ""
    (m,) = c.list().models
    assert m.model == "tiny" and m.details.family == "qwen35" and len(m.digest) == 64
    assert {"completion", "tools", "thinking"} <= set(c.show("tiny").capabilities)
    assert [x.model for x in c.ps().models] == ["tiny"]
    assert httpx.get(srv.url + "/api/version").json()["version"]
    assert httpx.get(srv.url + "/").text.startswith("qwen35 is running")  # (a client's probe)
    with pytest.raises(ollama.ResponseError, match="belong to Ollama itself") as e:
        c.pull("qwen3.5:9b")  # (model management is Ollama's own)
    assert e.value.status_code == 404


@pytest.mark.parametrize("path, body, status, says", [
    ("/api/chat", {"model": "nope", "messages": SYSTEM_USER}, 404, "model 'nope' not found"),
    ("/api/chat", {"messages": SYSTEM_USER}, 400, "model is required"),
    ("/api/chat", {"model": "tiny", "messages": [1]}, 400, "role must be"),
    ("/api/chat", {"model": "tiny"}, 400, "non-empty list"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "robot"}]}, 400, "role must be"),
    ("/api/chat", {"model": "tiny", "messages": SYSTEM_USER, "think": "max"}, 400, "think must"),
    ("/api/chat", {"model": "tiny", "messages": SYSTEM_USER, "format": "xml"}, 400, "format"),
    ("/api/chat", {"model": "tiny", "messages": SYSTEM_USER, "options": {"temperature": -1}},
     400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x",
                                                  "images": ["%%%"]}]}, 400, "not base64"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "raw": True}, 400, "/v1/completions"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 2]}, 400, "/api/chat"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
])  # fmt: skip
def test_errors_in_ollamas_shape(serve, path, body, status, says):
    srv, _ = serve(FakeEngine())
    r = httpx.post(srv.url + path, json={"stream": False, **body})
    assert r.status_code == status and set(r.json()) == {"error"}, r.text
    assert says in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as e:  # (the client raises them with the status)
        client(srv).chat(model="nope", messages=SYSTEM_USER)
    assert e.value.status_code == 404


def test_api_key_and_failure_mid_stream(serve):
    eng = FakeEngine(reply="Hello there")
    srv, _ = serve(eng, api_key="sekrit")
    r = httpx.post(srv.url + "/api/chat", json={"model": "tiny", "messages": SYSTEM_USER})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert client(srv, "sekrit").chat(model="tiny", messages=SYSTEM_USER).done
    eng.fail_next_step = True
    r = httpx.post(srv.url + "/api/chat", headers={"authorization": "Bearer sekrit"},
                   json={"model": "tiny", "messages": SYSTEM_USER})  # fmt: skip
    assert set(json.loads(r.text.splitlines()[-1])) == {"error"}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    yield from serving_tiny_engine(tmp_path_factory.mktemp("ollama") / "tiny")


def test_real_engine_stream_image_and_format(real):
    """The real engine: a greedy stream equals the whole reply; an image (base64, as the client
    sends it) reaches the vision tower, the prompt as many tokens as the chat request's; a
    format schema constrains the reply."""
    import numpy as np
    from PIL import Image

    srv, oa, engine = real
    c = client(srv)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}],
              options={"temperature": 0, "num_predict": 12})  # fmt: skip
    whole = c.chat(**kw)
    parts = list(c.chat(**kw, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count
    (m,) = c.list().models
    assert m.size > 0 and m.details.format == "safetensors" and m.details.parameter_size
    assert m.details.quantization_level in ("F32", "BF16")  # (the tiny engine's weights)
    assert "vision" in c.show("tiny").capabilities and engine.has_vision
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        buf, format="PNG")
    r = c.chat(model="tiny", think=False, options={"num_predict": 1}, messages=[
        {"role": "user", "content": "What is it?", "images": [buf.getvalue()]}])  # fmt: skip
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    chat = oa.chat.completions.create(model="tiny", max_tokens=1, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is it?"}]}],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    text = c.chat(model="tiny", think=False, options={"num_predict": 1},
                  messages=[{"role": "user", "content": "What is it?"}])  # fmt: skip
    assert r.prompt_eval_count == chat.usage.prompt_tokens > text.prompt_eval_count + 4
    junk = base64.b64encode(b"not an image, only bytes").decode()
    bad = httpx.post(srv.url + "/api/chat", json={"model": "tiny", "stream": False, "messages": [
        {"role": "user", "content": "x", "images": [junk]}]})  # fmt: skip
    assert bad.status_code == 400 and set(bad.json()) == {"error"}, bad.text
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}  # fmt: skip
    r = c.chat(model="tiny", think=False, format=schema, options={"num_predict": 40},
               messages=kw["messages"])  # fmt: skip
    if r.done_reason == "stop":  # (random weights may run out of tokens mid-object)
        assert isinstance(json.loads(r.message.content)["a"], int)
    else:
        assert r.message.content.startswith("{")
