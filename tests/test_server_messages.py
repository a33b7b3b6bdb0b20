"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) driven by the official
`anthropic` SDK: the request renders the same prompt as the equivalent chat request, the reply's
blocks (thinking, text, tool_use), stop reasons and usage, streaming events == the whole reply,
errors in Anthropic's shape, x-api-key auth. FakeEngine replies are canned (tests/server_fakes.py);
one test runs the real engine on a tiny checkpoint."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from server_fakes import CALL, TOOLS, FakeEngine, serving, serving_tiny_engine

WEATHER = {"name": "get_weather", "description": TOOLS[0]["function"]["description"],
           "input_schema": TOOLS[0]["function"]["parameters"]}  # fmt: skip


@pytest.fixture
def serve():
    yield from serving()


def claude(srv, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)


def test_reply_blocks_usage_and_prompt(serve):
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there!")
    srv, client = serve(eng)
    c = claude(srv)
    r = c.messages.create(model="tiny", max_tokens=50, system="Be brief.",
                          messages=[{"role": "user", "content": "Hi!"}])  # fmt: skip
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking.strip() == "Let me think."
    assert r.content[1].text.strip() == "Hi there!"
    assert r.stop_reason == "end_turn" and r.stop_sequence is None and r.role == "assistant"
    prompt = eng.added[-1][1]
    want = eng.chat_template.render([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi!"}])  # fmt: skip
    assert prompt == want
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(eng.tokenizer.encode(want))
    assert r.usage.output_tokens == len(eng.reply_ids) + 1  # (and the EOS)
    n = c.messages.count_tokens(model="tiny", system="Be brief.",
                                messages=[{"role": "user", "content": "Hi!"}])  # fmt: skip
    assert n.input_tokens == len(eng.tokenizer.encode(want))
    # thinking disabled: the prompt closes the think block, the reply is text only
    eng.reply_ids = eng.tokenizer.encode("Hi there!")
    r = c.messages.create(model="tiny", max_tokens=50, thinking={"type": "disabled"},
                          messages=[{"role": "user", "content": "Hi!"}])  # fmt: skip
    assert eng.added[-1][1].endswith("<think>\n\n</think>\n\n")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Hi there!"


def test_final_assistant_message_is_a_prefill(serve):
    eng = FakeEngine(reply=" a fine day.")
    srv, _ = serve(eng)
    r = claude(srv).messages.create(model="tiny", max_tokens=50, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Today is"}])  # fmt: skip
    assert eng.added[-1][1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nToday is")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == " a fine day."
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        claude(srv).messages.create(model="tiny", max_tokens=5, messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}])  # fmt: skip


def test_conversation_with_tools_renders_as_chat(serve):
    """tool_use / tool_result blocks, a thinking block and an image become the chat messages the
    chat endpoint renders (the same prompt text)."""
    eng = FakeEngine(reply=CALL)
    srv, _ = serve(eng)
    c = claude(srv)
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Call the tool.", "signature": ""},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp": 21}'},
            {"type": "text", "text": "And Rome?"}]},
    ]  # fmt: skip
    r = c.messages.create(model="tiny", max_tokens=80, tools=[WEATHER], messages=msgs,
                          thinking={"type": "disabled"})  # fmt: skip
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Call the tool.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": '{"temp": 21}'},
        {"role": "user", "content": [{"type": "text", "text": "And Rome?"}]},
    ]  # fmt: skip
    want = eng.chat_template.render(chat, tools=TOOLS, enable_thinking=False)
    assert eng.added[-1][1] == want
    assert r.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in r.content] == [
        ("tool_use", "get_weather", {"city": "Paris"})]
    # the same reply streamed: the SDK's accumulated message equals it
    with c.messages.stream(model="tiny", max_tokens=80, tools=[WEATHER], messages=msgs,
                           thinking={"type": "disabled"}) as s:  # fmt: skip
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [
        ("tool_use", "get_weather", {"city": "Paris"})]
    # tool_choice any: the call is guaranteed (constrained decoding) and still returned
    r = c.messages.create(model="tiny", max_tokens=80, tools=[WEATHER], messages=msgs[:1],
                          tool_choice={"type": "any"})  # fmt: skip
    assert eng.added[-1][2].structured_outputs is not None


def test_streaming_events_equal_the_reply(serve):
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there, friend!")
    srv, _ = serve(eng)
    c = claude(srv)
    kw = dict(model="tiny", max_tokens=50, messages=[{"role": "user", "content": "Hi!"}])
    whole = c.messages.create(**kw)
    with c.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[1].text
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    # the raw events: message_start first, message_stop last, no OpenAI [DONE]
    r = httpx.post(srv.url + "/v1/messages", json={**kw, "stream": True})
    names = [ln[7:] for ln in r.text.splitlines() if ln.startswith("event: ")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "[DONE]" not in r.text
    assert names.count("content_block_start") == names.count("content_block_stop") == 2


def test_pings_while_no_token_comes(serve, monkeypatch):
    """message_start goes at once; a stream waiting for its first token (a long prefill) gets
    `ping` events, which the SDK skips."""
    from qwen35.server import serving_messages

    monkeypatch.setattr(serving_messages, "PING_S", 0.05)
    eng = FakeEngine(reply="Hi there")
    srv, _ = serve(eng)
    eng.step_delay = 0.3
    kw = dict(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "Hi"}],
              thinking={"type": "disabled"})  # fmt: skip
    r = httpx.post(srv.url + "/v1/messages", json={**kw, "stream": True}, timeout=30)
    names = [ln[7:] for ln in r.text.splitlines() if ln.startswith("event: ")]
    assert names[0] == "message_start" and names[1] == "ping"
    with claude(srv).messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.content[0].text == eng.tokenizer.decode(eng.reply_ids[:3])


def test_stop_reasons(serve):
    eng = FakeEngine(reply="one two three four")
    srv, _ = serve(eng)
    c = claude(srv)
    user = [{"role": "user", "content": "count"}]
    off = {"type": "disabled"}
    r = c.messages.create(model="tiny", max_tokens=2, messages=user, thinking=off)
    assert r.stop_reason == "max_tokens"
    r = c.messages.create(model="tiny", max_tokens=50, messages=user, thinking=off,
                          stop_sequences=["three"])  # fmt: skip
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", "three")
    assert r.content[0].text == "one two "
    with c.messages.stream(model="tiny", max_tokens=50, messages=user, thinking=off,
                           stop_sequences=["three"]) as s:  # fmt: skip
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "three")


@pytest.mark.parametrize("body, status, kind, says", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
     "max_tokens"),
    ({"max_tokens": 5, "messages": []}, 400, "invalid_request_error", "must not be empty"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error", "`system`"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, 400,
     "invalid_request_error", "unsupported block 'document'"),
    ({"max_tokens": 5, "model": "claude-x", "messages": [{"role": "user", "content": "x"}]}, 404,
     "not_found_error", "claude-x"),
    ({"max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
     "only custom tools"),
    ({"max_tokens": 5, "tool_choice": {"type": "tool"}, "messages": [
        {"role": "user", "content": "x"}]}, 400, "invalid_request_error", "tool_choice"),
    ({"max_tokens": 5, "extra_body": {"temperature": 9},
      "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
     "temperature"),
    ({"max_tokens": 5, "output_config": {"format": {"type": "xml"}},
      "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
     "output_config.format"),
])  # fmt: skip
def test_errors_in_anthropic_shape(serve, body, status, kind, says):
    srv, _ = serve(FakeEngine())
    raw = {k: v for k, v in body.items() if k != "extra_body"} | body.get("extra_body", {})
    r = httpx.post(srv.url + "/v1/messages", json=raw)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind, err
    assert says in err["error"]["message"]
    if "max_tokens" not in body:  # (the SDK itself requires it)
        return
    # the SDK raises its own error class for it
    with pytest.raises(anthropic.APIStatusError) as e:
        claude(srv).messages.create(**{"model": "tiny", "max_tokens": 5, **body})
    assert e.value.status_code == (404 if status == 404 else 400)


def test_x_api_key_auth(serve):
    srv, _ = serve(FakeEngine(reply="ok"), api_key="sekret")
    r = claude(srv, "sekret").messages.create(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert r.content
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(srv, "wrong").messages.create(
            model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    # the OpenAI endpoints take the Anthropic header too (one key, any client)
    r = httpx.post(srv.url + "/v1/completions", headers={"x-api-key": "sekret"},
                   json={"prompt": "Hi", "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200


def test_engine_failure_mid_stream_is_an_error_event(serve):
    eng = FakeEngine(reply="Hello there")
    srv, _ = serve(eng)
    eng.fail_next_step = True
    r = httpx.post(srv.url + "/v1/messages", json={
        "model": "tiny", "max_tokens": 5, "stream": True,
        "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    events = [ln for ln in r.text.splitlines() if ln.startswith(("event: ", "data: "))]
    assert events[-2] == "event: error"
    assert json.loads(events[-1][6:])["type"] == "error"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    yield from serving_tiny_engine(tmp_path_factory.mktemp("messages") / "tiny")


def test_real_engine_stream_equals_whole(real):
    srv, _, engine = real
    c = claude(srv)
    kw = dict(model="tiny", max_tokens=12, extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "Tell me a story"}])  # fmt: skip
    whole = c.messages.create(**kw)
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert whole.usage.output_tokens == 12 or whole.stop_reason == "end_turn"
    n = c.messages.count_tokens(model="tiny", messages=kw["messages"])
    assert n.input_tokens == whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    # output_config.format: the text is JSON valid against the schema (constrained decoding)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}  # fmt: skip
    r = c.messages.create(model="tiny", max_tokens=40, thinking={"type": "disabled"},
                          output_config={"format": {"type": "json_schema", "schema": schema}},
                          messages=kw["messages"])  # fmt: skip
    if r.stop_reason == "end_turn":  # (random weights may run out of tokens mid-object)
        assert isinstance(json.loads(r.content[0].text)["a"], int)
    else:
        assert r.stop_reason == "max_tokens" and r.content[0].text.startswith("{")


def test_real_engine_images_in_user_and_tool_result(real):
    """Image blocks (base64) in a user message and inside a tool_result (a tool's screenshot)
    reach the vision tower: the prompt has as many tokens as the equivalent chat request's."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    srv, client, engine = real
    assert engine.has_vision
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": data}}  # fmt: skip
    msgs = [{"role": "user", "content": [image, {"type": "text", "text": "Shot it again."}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot",
                                                "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [image, {"type": "text", "text": "ok"}]}]}]  # fmt: skip
    tool = {"name": "shot", "input_schema": {"type": "object", "properties": {}}}
    r = claude(srv).messages.create(model="tiny", max_tokens=2, messages=msgs, tools=[tool],
                                    thinking={"type": "disabled"})  # fmt: skip
    url = f"data:image/png;base64,{data}"
    part = {"type": "image_url", "image_url": {"url": url}}
    chat = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": [part, {"type": "text", "text": "Shot it again."}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": [part, {"type": "text", "text": "ok"}]}],
        tools=[{"type": "function", "function": {"name": "shot", "parameters": tool[
            "input_schema"]}}], extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    n = claude(srv).messages.count_tokens(model="tiny", messages=msgs, tools=[tool],
                                          thinking={"type": "disabled"})  # fmt: skip
    assert n.input_tokens == chat.usage.prompt_tokens
    from qwen35.multimodal.sizing import image_grid, num_tokens

    eng_text = engine.chat_template.render(
        [{"role": "user", "content": [part, {"type": "text", "text": "Shot it again."}]},
         {"role": "assistant", "content": "", "tool_calls": [
             {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": {}}}]},
         {"role": "tool", "content": [part, {"type": "text", "text": "ok"}]}],
        tools=[{"type": "function", "function": {"name": "shot", "parameters": tool[
            "input_schema"]}}], enable_thinking=False)  # fmt: skip
    assert eng_text.count("<|image_pad|>") == 2  # each image: one placeholder -> its tokens
    n_img = num_tokens(image_grid(64, 48))
    assert chat.usage.prompt_tokens == len(engine.tokenizer.encode(eng_text)) - 2 + 2 * n_img


def test_max_tokens_beyond_the_context_is_cut_to_fit(serve):
    """Anthropic clients send max_tokens 32,000 whatever the server: here it becomes what the
    context leaves after the prompt (the chat endpoint keeps refusing it, as vLLM does)."""
    eng = FakeEngine(reply="ok", max_model_len=512)
    srv, client = serve(eng)
    user = [{"role": "user", "content": "Hi"}]
    with claude(srv).messages.stream(model="tiny", max_tokens=32000, messages=user) as s:
        r = s.get_final_message()  # (the SDK streams such a request)
    prompt = len(eng.tokenizer.encode(eng.added[-1][1]))
    assert r.stop_reason == "end_turn" and eng.added[-1][2].max_tokens == 512 - prompt
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user, "max_tokens": 32000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_model_aliases(serve):
    """--served-model-name A B: requests may name any of them (e.g. the model an Anthropic client
    asks for), replies carry the first; /v1/models lists each."""
    srv, client = serve(FakeEngine(reply="ok"), model_aliases=("claude-sonnet-4-5",))
    r = claude(srv).messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                    messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
    assert r.model == "tiny"
    assert client.chat.completions.create(model="claude-sonnet-4-5", max_tokens=2,
                                          messages=[{"role": "user", "content": "x"}]).model == "tiny"
    assert [m.id for m in client.models.list().data] == ["tiny", "claude-sonnet-4-5"]
    with pytest.raises(anthropic.NotFoundError):
        claude(srv).messages.create(model="claude-opus", max_tokens=5,
                                    messages=[{"role": "user", "content": "Hi"}])  # fmt: skip


def test_real_engine_second_turn_reads_the_prefix_cache(real):
    """An agent loop's next request repeats the conversation: usage.cache_read_input_tokens
    counts what the hybrid prefix cache served, and input_tokens the rest."""
    srv, _, _ = real
    c = claude(srv)
    system = "You are a careful assistant. " * 40
    msgs = [{"role": "user", "content": "List three colours."}]
    first = c.messages.create(model="tiny", max_tokens=6, system=system, messages=msgs,
                              thinking={"type": "disabled"})  # fmt: skip
    reply = [{"type": b.type, "text": b.text} for b in first.content if b.type == "text"]
    msgs += [{"role": "assistant", "content": reply or "ok"},
             {"role": "user", "content": "And three more."}]
    second = c.messages.create(model="tiny", max_tokens=6, system=system, messages=msgs,
                               thinking={"type": "disabled"})  # fmt: skip
    assert second.usage.cache_read_input_tokens >= 200
    total = second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert total > first.usage.input_tokens + first.usage.cache_read_input_tokens
