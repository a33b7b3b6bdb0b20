"""The OpenAI-compatible server over HTTP with the official `openai` client, on a deterministic
FakeEngine (tests/server_fakes.py): its canned replies exercise reasoning / tool-call parsing, and
it can be frozen or made to fail, for queue limits, disconnects and engine failures that random
weights cannot produce on demand. The real engine is in test_server_real.py and
test_server_load.py.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from server_fakes import CALL, TOOLS, USER, FakeEngine, serving, stream_chat, wait_until


@pytest.fixture
def serve():
    yield from serving()


# ---- fake engine: completions -----------------------------------------------------------------


def test_models_health_and_completion(serve):
    eng = FakeEngine()
    srv, client = serve(eng)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4/x")
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    r = client.completions.create(model="tiny", prompt="Hi there", max_tokens=4)
    assert r.choices[0].text == eng.tokenizer.decode(eng.reply_ids[:4])
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(eng.tokenizer.encode("Hi there"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 4)
    # the model path is accepted as the model name too
    r = client.completions.create(model="/models/tiny", prompt=[1, 2, 3], max_tokens=2)
    assert r.usage.prompt_tokens == 3 and r.model == "tiny"


def test_completion_stream_batch_n_usage(serve):
    eng = FakeEngine()
    srv, client = serve(eng)
    text: dict[int, str] = {}
    finish, usage = {}, None
    for ch in client.completions.create(
        model="tiny", prompt=["a b", "c"], n=2, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
        usage = ch.usage or usage
    want = eng.tokenizer.decode(eng.reply_ids[:5])
    assert text == {i: want for i in range(4)} and set(finish.values()) == {"length"}
    assert usage.completion_tokens == 20
    # each prompt counts once, whatever n is
    assert usage.prompt_tokens == len(eng.tokenizer.encode("a b")) + len(eng.tokenizer.encode("c"))
    # the raw SSE stream ends with [DONE]
    with httpx.stream("POST", srv.url + "/v1/completions",
                      json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:  # fmt: skip
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats(serve, path):
    """vLLM's stream_options.continuous_usage_stats: with include_usage, every chunk with output
    carries the usage so far (completion tokens growing to the final usage's count); without
    include_usage, or without the option, only the last chunk has a usage."""
    eng = FakeEngine(reply="one two three four five six")
    srv, _ = serve(eng)
    body = {"model": "tiny", "max_tokens": 5, "stream": True}
    body.update({"prompt": "Hi"} if "chat" not in path else {"messages": USER})

    def chunks(opts):
        with httpx.stream("POST", srv.url + path, json={**body, "stream_options": opts}) as r:
            return [json.loads(ln[6:]) for ln in r.iter_lines() if ln and ln != "data: [DONE]"]

    got = chunks({"include_usage": True, "continuous_usage_stats": True})
    with_output = [c for c in got if c["choices"] and any(
        ch.get("text") or ch.get("delta", {}).get("content") or ch.get("delta", {}).get(
            "reasoning_content") or ch.get("finish_reason") for ch in c["choices"])]  # fmt: skip
    assert with_output and all("usage" in c for c in with_output)
    counts = [c["usage"]["completion_tokens"] for c in with_output]
    assert counts == sorted(counts) and 0 < counts[0] and counts[-1] == 5
    assert got[-1]["choices"] == [] and got[-1]["usage"]["completion_tokens"] == 5
    prompt = got[-1]["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in with_output)
    for opts in ({"include_usage": True}, {"continuous_usage_stats": True}):
        plain = chunks(opts)
        with_usage = [c for c in plain if "usage" in c and c["usage"] is not None]
        assert with_usage == ([plain[-1]] if opts.get("include_usage") else []), opts


def test_completion_logprobs_stop_and_echo(serve):
    eng = FakeEngine(reply="Hello! How can I help?")
    _, client = serve(eng)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [eng.tokenizer.decode([t]) for t in eng.reply_ids[:3]]
    assert lp.token_logprobs == [-0.25] * 3 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    r = client.completions.create(model="tiny", prompt="x", max_tokens=20, stop=["can"])
    assert r.choices[0].text == "Hello! How " and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="Say: ", max_tokens=1, echo=True)
    assert r.choices[0].text == "Say: Hello"


def test_sampling_extras_reach_the_engine(serve):
    eng = FakeEngine()
    _, client = serve(eng)
    client.completions.create(
        model="tiny", prompt="x", max_tokens=3, temperature=0.5, top_p=0.9, seed=7,
        presence_penalty=0.5, frequency_penalty=0.25,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 2, "stop_token_ids": [42]},
    )  # fmt: skip
    p = eng.added[-1][2]
    assert (p.temperature, p.top_p, p.seed, p.top_k, p.min_p, p.repetition_penalty) == (
        0.5, 0.9, 7, 5, 0.1, 1.1,
    )  # fmt: skip
    assert (p.presence_penalty, p.frequency_penalty, p.ignore_eos, p.min_tokens) == (
        0.5, 0.25, True, 2,
    )  # fmt: skip
    assert p.stop_token_ids == [42] and p.max_tokens == 3


def test_generation_config_defaults_fill_unset_fields(serve):
    """The engine's request defaults (a checkpoint's generation_config.json) apply to fields a
    request leaves unset, in completions and chat; a request's own values win, 0 included."""
    eng = FakeEngine()
    eng.default_sampling = {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                            "presence_penalty": 1.5}  # (--override-generation-config's too)
    _, client = serve(eng)
    client.completions.create(model="tiny", prompt="x", max_tokens=2)
    p = eng.added[-1][2]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
        0.6, 0.95, 20, 0.0, 1.0,
    )  # fmt: skip
    assert (p.presence_penalty, p.frequency_penalty) == (1.5, 0.0)
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
        extra_body={"top_k": 0}, presence_penalty=0,
    )  # fmt: skip
    p = eng.added[-1][2]
    assert (p.temperature, p.top_p, p.top_k, p.presence_penalty) == (0.0, 0.95, 0, 0.0)
    client.responses.create(model="tiny", input="hi", max_output_tokens=2)
    assert eng.added[-1][2].presence_penalty == 1.5


# ---- fake engine: chat, reasoning, tools -------------------------------------------------------


def test_chat_reasoning_routed(serve):
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there!")
    _, client = serve(eng)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=50)
    m = r.choices[0].message
    assert m.reasoning_content.strip() == "Let me think." and m.content.strip() == "Hi there!"
    assert r.choices[0].finish_reason == "stop"
    assert eng.added[-1][1].endswith("<|im_start|>assistant\n<think>\n")
    think = len(eng.tokenizer.encode(m.reasoning_content))  # (OpenAI's usage detail)
    assert r.usage.completion_tokens_details.reasoning_tokens == think
    acc, chunks = stream_chat(client, messages=USER, max_tokens=50,
                              stream_options={"include_usage": True})  # fmt: skip
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == think
    assert acc[0]["reasoning"].strip() == "Let me think."
    assert acc[0]["content"].strip() == "Hi there!" and acc[0]["finish"] == "stop"


def test_chat_thinking_off(serve):
    eng = FakeEngine(reply="Hi there!")
    srv, client = serve(eng)
    kw = dict(
        messages=USER,
        max_tokens=50,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    r = client.chat.completions.create(model="tiny", **kw)
    assert r.choices[0].message.content == "Hi there!"
    assert not r.choices[0].message.reasoning_content
    assert eng.added[-1][1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    acc, chunks = stream_chat(client, **kw)
    assert acc[0]["content"] == "Hi there!" and acc[0]["reasoning"] == ""
    assert chunks[0].choices[0].delta.role == "assistant"
    # OpenAI's reasoning_effort: "none" / "minimal" off, others on; enable_thinking wins
    for effort, closed in (("none", True), ("minimal", True), ("low", False), ("high", False)):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                       reasoning_effort=effort)  # fmt: skip
        assert eng.added[-1][1].endswith("<think>\n\n</think>\n\n") == closed, effort
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                   reasoning_effort="none", extra_body=on)  # fmt: skip
    assert eng.added[-1][1].endswith("<think>\n")
    r = httpx.post(srv.url + "/v1/chat/completions",
                   json={"messages": USER, "reasoning_effort": "extreme"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def test_chat_continue_final_message_and_echo(serve):
    """vLLM's chat extras: the prompt ends inside the final (assistant) message so the model
    continues it; echo puts that message's text before the reply; add_generation_prompt off
    ends the prompt after the last message's turn."""
    eng = FakeEngine(reply="a fine day.")
    srv, client = serve(eng)
    msgs = USER + [{"role": "assistant", "content": "Today is "}]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=50,
                                       extra_body=extra)  # fmt: skip
    assert eng.added[-1][1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nToday is")
    assert r.choices[0].message.content == "a fine day." and not r.choices[0].message.reasoning_content
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=50,
                                       extra_body={**extra, "echo": True})  # fmt: skip
    assert r.choices[0].message.content == "Today is a fine day."
    acc, chunks = stream_chat(client, messages=msgs, max_tokens=50, n=2,
                              extra_body={**extra, "echo": True})  # fmt: skip
    assert [acc[i]["content"] for i in (0, 1)] == ["Today is a fine day."] * 2
    assert chunks[0].choices[0].delta.content == "Today is "
    # echo only repeats an assistant message; a user message is not part of the reply
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=50,
                                       extra_body={"echo": True, **off})  # fmt: skip
    assert r.choices[0].message.content == "a fine day."
    # add_generation_prompt off: the prompt ends with the last message's end of turn
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=5,
                                   extra_body={"add_generation_prompt": False})  # fmt: skip
    assert eng.added[-1][1].endswith("<|im_start|>user\nHi!<|im_end|>\n")
    # /tokenize renders the same prompt
    r = httpx.post(srv.url + "/tokenize", json={"messages": msgs, **extra})
    assert eng.tokenizer.decode(r.json()["tokens"]).endswith("</think>\n\nToday is")


def test_request_chat_template(serve):
    """vLLM's per-request chat_template: a 400 unless the server trusts request templates
    (--trust-request-chat-template), then rendered instead of the model's (never ignored)."""
    tpl = ("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}<<assistant>>{% endif %}")  # fmt: skip
    eng = FakeEngine(reply="ok")
    srv, _ = serve(eng)
    body = {"messages": USER, "max_tokens": 2, "chat_template": tpl}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert "--trust-request-chat-template" in r.json()["error"]["message"] and not eng.added
    eng2 = FakeEngine(reply="ok")
    srv2, _ = serve(eng2, trust_request_chat_template=True)
    r = httpx.post(srv2.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and eng2.added[-1][1] == "<<user>>Hi!\n<<assistant>>"
    r = httpx.post(srv2.url + "/tokenize", json={"messages": USER, "chat_template": tpl})
    assert eng2.tokenizer.decode(r.json()["tokens"]) == "<<user>>Hi!\n<<assistant>>"
    doc_tpl = "{% for d in documents %}[{{ d.title }}]{% endfor %}" + tpl  # vLLM's documents
    r = httpx.post(srv2.url + "/v1/chat/completions", json={
        **body, "chat_template": doc_tpl, "documents": [{"title": "A", "text": "t"}]})
    assert r.status_code == 200 and eng2.added[-1][1].startswith("[A]<<user>>")
    for bad, says in (("{% for m in messages %}", "does not compile"), ("  ", "empty")):
        r = httpx.post(srv2.url + "/v1/chat/completions", json={**body, "chat_template": bad})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_return_token_ids_and_include_reasoning(serve):
    """vLLM's return_token_ids: the prompt's ids once (chat: in the response / first chunk;
    completions: per choice) and each choice's generated ids (streamed: each chunk's own);
    include_reasoning false drops reasoning_content but still counts its tokens."""
    eng = FakeEngine(reply="Let me think.\n</think>\n\nHi there!")
    srv, client = serve(eng)
    url = srv.url + "/v1/chat/completions"
    body = {"messages": USER, "max_tokens": 50, "n": 2, "return_token_ids": True}
    r = httpx.post(url, json=body).json()
    want_prompt = eng.tokenizer.encode(eng.added[-1][1])
    assert r["prompt_token_ids"] == want_prompt
    assert [c["token_ids"] for c in r["choices"]] == [eng.reply_ids + [eng.eos]] * 2
    plain = httpx.post(url, json={"messages": USER, "max_tokens": 50}).json()
    assert plain["prompt_token_ids"] is None and plain["choices"][0]["token_ids"] is None
    chunks = list(client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=50, n=2, stream=True,
        extra_body={"return_token_ids": True}))  # fmt: skip
    assert chunks[0].model_extra["prompt_token_ids"] == want_prompt
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    for i in (0, 1):
        got = [t for c in chunks for ch in c.choices if ch.index == i
               for t in (ch.model_extra.get("token_ids") or [])]  # fmt: skip
        assert got == eng.reply_ids + [eng.eos]
    # completions: per choice, streamed and not
    r = client.completions.create(model="tiny", prompt=["a b", "c"], max_tokens=3,
                                  extra_body={"return_token_ids": True})  # fmt: skip
    assert [c.model_extra["prompt_token_ids"] for c in r.choices] == [
        eng.tokenizer.encode("a b"), eng.tokenizer.encode("c")]
    assert all(c.model_extra["token_ids"] == eng.reply_ids[:3] for c in r.choices)
    got: dict[int, list] = {}
    prompts: dict[int, list] = {}
    for ch in client.completions.create(model="tiny", prompt=[[5, 6, 7]], max_tokens=3, n=2,
                                        stream=True, extra_body={"return_token_ids": True}):
        for c in ch.choices:
            got.setdefault(c.index, []).extend(c.model_extra["token_ids"])
            if "prompt_token_ids" in c.model_extra:
                assert c.index not in prompts
                prompts[c.index] = c.model_extra["prompt_token_ids"]
    assert got == {0: eng.reply_ids[:3], 1: eng.reply_ids[:3]}
    assert prompts == {0: [5, 6, 7], 1: [5, 6, 7]}
    # return_tokens_as_token_ids: logprobs name tokens "token_id:N" (chat and completions)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logprobs=True,
                                       top_logprobs=2,
                                       extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [f"token_id:{t}" for t in eng.reply_ids[:3]]
    assert content[0].top_logprobs[0].token == f"token_id:{eng.reply_ids[0]}"
    assert content[0].bytes == list(eng.tokenizer.decode([eng.reply_ids[0]]).encode())
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="a b", max_tokens=3, logprobs=1,
                                      stream=stream,
                                      extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
        chunks = list(r) if stream else [r]
        toks = [t for ch in chunks for c in ch.choices for t in c.logprobs.tokens]
        assert toks == [f"token_id:{t}" for t in eng.reply_ids[:3]]
        tops = [k for ch in chunks for c in ch.choices for d in c.logprobs.top_logprobs for k in d]
        assert tops == toks
    # include_reasoning false: no reasoning_content, the usage still counts it
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=50,
                                       extra_body={"include_reasoning": False})  # fmt: skip
    m = r.choices[0].message
    assert m.reasoning_content is None and m.content.strip() == "Hi there!"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    acc, _ = stream_chat(client, messages=USER, max_tokens=50,
                         extra_body={"include_reasoning": False})  # fmt: skip
    assert acc[0]["reasoning"] == "" and acc[0]["content"].strip() == "Hi there!"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("inside_think", [False, True])
def test_chat_tool_calls(serve, stream, inside_think):
    reply = (
        ("Need the weather.\n" + CALL + "\n</think>\n\n")
        if inside_think
        else ("Need the weather.\n</think>\n\n" + CALL)
    )
    eng = FakeEngine(reply=reply)
    _, client = serve(eng)
    kw = dict(
        messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=80
    )
    if stream:
        acc, _ = stream_chat(client, **kw)
        calls = [acc[0]["calls"][i] for i in sorted(acc[0]["calls"])]
        finish = acc[0]["finish"]
        names = [c["name"] for c in calls]
        args = [json.loads(c["arguments"]) for c in calls]
        assert all(c["id"] for c in calls)
        assert acc[0]["reasoning"].strip().startswith("Need the weather.")
    else:
        r = client.chat.completions.create(model="tiny", **kw)
        m = r.choices[0].message
        finish = r.choices[0].finish_reason
        names = [c.function.name for c in m.tool_calls]
        args = [json.loads(c.function.arguments) for c in m.tool_calls]
        assert all(c.id and c.type == "function" for c in m.tool_calls)
        assert "<tool_call>" not in (m.content or "") + (m.reasoning_content or "")
    assert names == ["get_weather"] and args == [{"city": "Paris"}] and finish == "tool_calls"
    assert "<tools>" in eng.added[-1][1]


def test_malformed_tool_call_is_content(serve):
    bad = "<tool_call>\n<function=get_weather\nthis is not a call"
    eng = FakeEngine(reply=bad)
    _, client = serve(eng)
    kw = dict(
        messages=USER, tools=TOOLS, max_tokens=60,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    r = client.chat.completions.create(model="tiny", **kw)
    m = r.choices[0].message
    assert not m.tool_calls and "this is not a call" in m.content
    assert r.choices[0].finish_reason == "stop"
    acc, _ = stream_chat(client, **kw)
    assert not acc[0]["calls"] and "this is not a call" in acc[0]["content"]


def test_tool_choice_none_and_named(serve):
    eng = FakeEngine(reply=CALL)
    _, client = serve(eng)
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=60
    )
    assert "<tools>" not in eng.added[-1][1] and not r.choices[0].message.tool_calls
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    client.chat.completions.create(
        model="tiny", messages=USER, tools=[*TOOLS, other], max_tokens=5,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    assert '"get_weather"' in eng.added[-1][1] and '"other"' not in eng.added[-1][1]


def test_tool_round_trip_prompt(serve):
    eng = FakeEngine(reply="Got it.\n</think>\n\nIt is 21C in Paris.")
    _, client = serve(eng)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]  # fmt: skip
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=40)
    assert r.choices[0].message.content.strip().endswith("21C in Paris.")
    prompt = eng.added[-1][1]
    assert "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in prompt


def test_chat_logprobs_and_n(serve):
    eng = FakeEngine(reply="Hi there!")
    _, client = serve(eng)
    r = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=2, n=2, logprobs=True, top_logprobs=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    assert len(r.choices) == 2 and r.usage.completion_tokens == 4
    content = r.choices[1].logprobs.content
    assert [c.token for c in content] == [eng.tokenizer.decode([t]) for t in eng.reply_ids[:2]]
    assert all(len(c.top_logprobs) == 2 and c.logprob == -0.25 for c in content)
    assert content[0].bytes == list(content[0].token.encode())


# ---- errors ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("chat", {"messages": USER, "max_tokens": -1}, "max_tokens"),
    ("chat", {"messages": USER, "max_completion_tokens": 0}, "max_tokens"),
    ("chat", {"messages": USER, "temperature": 3}, "temperature"),
    ("chat", {"messages": USER, "top_p": 0}, "top_p"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": "hello"}, "messages"),
    ("chat", {"messages": USER, "max_tokens": "many"}, "max_tokens"),
    ("chat", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat", {"messages": USER, "chat_template_kwargs": {"enable_thinking": "no"}},
     "chat_template_kwargs.enable_thinking"),
    ("chat", {"messages": USER, "n": 0}, "n"),
    ("chat", {"messages": USER, "max_tokens": 100000}, "messages"),
    ("chat", {"messages": USER, "tools": TOOLS,
              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("chat", {"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
    ("chat", {"messages": USER, "continue_final_message": True}, "continue_final_message"),
    ("chat", {"messages": USER, "use_beam_search": True}, "use_beam_search"),
    ("completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("completions", {"prompt": "x", "cache_salt": ""}, "cache_salt"),
    ("chat", {"messages": [{"role": "user", "content": []}], "continue_final_message": True,
              "add_generation_prompt": False}, "continue_final_message"),
    ("completions", {"prompt": "x", "logprobs": 30}, "logprobs"),
    ("completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
]  # fmt: skip


def test_bad_requests_are_400_and_server_keeps_serving(serve):
    eng = FakeEngine()
    srv, client = serve(eng)
    for route, body, param in BAD_REQUESTS:
        url = srv.url + ("/v1/chat/completions" if route == "chat" else "/v1/completions")
        r = httpx.post(url, json={"model": "tiny", **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
        assert err["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 100000})
    assert "too many" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(srv.url + "/v1/chat/completions", content=b'{"messages": [')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert (
        client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens
        == 2
    )
    assert not eng.has_unfinished_requests()


def test_api_key_and_body_limit(serve):
    eng = FakeEngine()
    srv, client = serve(eng, api_key="sekret", max_body_bytes=2000)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(srv.url + "/metrics").status_code == 401
    assert httpx.get(srv.url + "/health").status_code == 200  # open for load balancers
    r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": "Bearer sekret"},
                   json={"prompt": "x" * 5000})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    metrics = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer sekret"}).text
    assert 'qwen35_requests_total{endpoint="/v1/models",status="401"} 1.0' in metrics
    assert 'qwen35_requests_total{endpoint="/v1/completions",status="413"} 1.0' in metrics


def test_queue_full_is_503(serve):
    eng = FakeEngine(max_num_seqs=1)
    srv, client = serve(eng, max_queue=1)
    eng.gate.clear()  # the loop thread will block inside step() with request A running
    results = {}

    def run(name):
        r = client.completions.create(model="tiny", prompt="x", max_tokens=3)
        results[name] = r.choices[0].text

    a = threading.Thread(target=run, args=("a",))
    a.start()
    wait_until(lambda: len(eng.added) == 1)
    b = threading.Thread(target=run, args=("b",))
    b.start()
    wait_until(lambda: srv.state.async_engine.num_waiting() == 1)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=3)
    assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    eng.gate.set()
    a.join(30)
    b.join(30)
    assert results == {"a": "Hello! How", "b": "Hello! How"}


def test_disconnect_aborts_and_frees(serve):
    eng = FakeEngine()
    eng.step_delay = 0.01
    srv, _ = serve(eng, disconnect_poll_s=0.05)
    body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i >= 4:
                break
    wait_until(lambda: len(eng.aborted) == 1)
    wait_until(lambda: srv.state.async_engine.stats.get("kv_blocks_used") == 0)
    # a non-streaming client that gives up is noticed by polling and aborted too
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3)
    wait_until(lambda: len(eng.aborted) == 2)
    wait_until(lambda: srv.state.async_engine.stats.get("state_slots_used") == 0)
    assert not eng.has_unfinished_requests()
    assert httpx.get(srv.url + "/health").status_code == 200


def test_engine_failure_fails_requests_and_health(serve):
    eng = FakeEngine()
    srv, client = serve(eng)
    eng.fail_next_step = True
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=3)
    assert e.value.status_code == 503
    assert httpx.get(srv.url + "/health").status_code == 503
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="tiny", prompt="x", max_tokens=3)


def test_engine_failure_mid_stream_sends_error_event(serve):
    eng = FakeEngine()
    srv, _ = serve(eng)
    eng.gate.clear()
    body = {"prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        wait_until(lambda: len(eng.added) == 1)
        eng.fail_next_step = True
        eng.gate.set()
        lines = [ln for ln in r.iter_lines() if ln]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "engine_dead"
    assert lines[-1] == "data: [DONE]"


def test_batch_prompts_are_all_or_none(serve):
    eng = FakeEngine(max_model_len=64)
    srv, _ = serve(eng)
    r = httpx.post(
        srv.url + "/v1/completions", json={"prompt": ["short", "long " * 60], "max_tokens": 4}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(eng.added) == 1 and eng.aborted == [eng.added[0][0]]  # the first one was undone
    assert not eng.has_unfinished_requests()


def test_metrics(serve):
    eng = FakeEngine()
    srv, client = serve(eng)
    client.completions.create(model="tiny", prompt="x", max_tokens=3)
    list(client.completions.create(model="tiny", prompt="x", max_tokens=3, stream=True))
    httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": -3})
    text = httpx.get(srv.url + "/metrics").text
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert float(lines['qwen35_requests_total{endpoint="/v1/completions",status="200"}']) == 2
    assert float(lines['qwen35_requests_total{endpoint="/v1/completions",status="400"}']) == 1
    assert float(lines["qwen35_generation_tokens_total"]) == 6
    assert float(lines["qwen35_prompt_tokens_total"]) == 2
    assert float(lines["qwen35_time_to_first_token_seconds_count"]) == 2
    assert float(lines["qwen35_inter_token_latency_seconds_count"]) == 4
    assert float(lines["qwen35_e2e_request_latency_seconds_count"]) == 2
    for name in ("kv_blocks_used", "kv_blocks_total", "state_slots_used", "state_slots_total",
                 "num_requests_running", "num_requests_waiting", "prefix_cache_hit_tokens_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total"):  # fmt: skip
        assert f"qwen35_{name}" in lines
    assert float(lines["qwen35_kv_blocks_total"]) == 1024


# ---- the chat response builder on canned model output ------------------------------------------


@pytest.mark.parametrize(
    "thinking,tools,text,want",
    [
        (True, None, "plan\n</think>\n\nanswer", ("plan", "answer", [])),
        (False, None, "just text", (None, "just text", [])),
        (True, TOOLS, "why\n</think>\n\n" + CALL, ("why", None, ["get_weather"])),
        (True, TOOLS, "why\n" + CALL + "\n</think>\n\nok", ("why", "ok", ["get_weather"])),
        (False, TOOLS, "<tool_call>\n<function=get_weather\nbroken", (None, "<tool_call>\n<function=get_weather\nbroken", [])),
        (False, None, CALL, (None, CALL, [])),  # no tools in the request: not parsed
    ],
)  # fmt: skip
def test_choice_builder_canned(thinking, tools, text, want):
    from qwen35.server.chat_output import ChoiceBuilder
    from qwen35.tokenizer import load_tokenizer

    b = ChoiceBuilder(thinking, tools)
    m = b.message(text)
    assert (m.reasoning_content, m.content, [c.function.name for c in m.tool_calls]) == want
    assert b.finish_reason("stop") == ("tool_calls" if want[2] else "stop")
    assert b.finish_reason("length") == "length"
    for c in m.tool_calls:
        assert json.loads(c.function.arguments) == {"city": "Paris"} and c.id.startswith("call")
    # streamed token by token, the deltas add up to the same message
    tok = load_tokenizer()
    s = ChoiceBuilder(thinking, tools)
    acc: dict = {}
    for t in tok.encode(text):
        acc = s.merge(acc, s.feed(tok.decode([t])))
    acc = s.merge(acc, s.finish())
    assert acc.get("reasoning_content") == want[0]
    assert acc.get("content") == (want[1] or None)
    assert [c["function"]["name"] for c in acc.get("tool_calls", [])] == want[2]
    assert [c["index"] for c in acc.get("tool_calls", [])] == list(range(len(want[2])))
