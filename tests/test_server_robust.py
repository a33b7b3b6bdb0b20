"""Issue 11 over HTTP, on the REAL engine (tiny random checkpoint, real tokenizer): bad sampling
values are 400s naming the field, refused requests leave nothing queued, a request the engine
fails is a 500 (or an SSE error event) for that request only, images without a vision encoder
are refused, logit_bias works and best_of != n is refused. After each: integrity holds, the
gauges are back to 0 and a normal request succeeds."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from qwen35.engine.sampler import Sampler
from qwen35.server.app import ServerConfig, create_app
from server_fakes import USER, ServerThread, assert_recovered, idle_stats


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from server_fakes import build_tiny_engine

    engine = build_tiny_engine(tmp_path_factory.mktemp("tiny-robust"), max_num_seqs=8, text_only=True)
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
    yield srv, engine
    srv.close()


def post(srv, path: str, body: dict) -> httpx.Response:
    # allow_nan: the client sends NaN / Infinity literals (Python's json does; JS cannot)
    data = json.dumps(body, allow_nan=True)
    return httpx.post(
        srv.url + path, content=data, headers={"content-type": "application/json"}, timeout=60
    )


def assert_healthy(srv) -> None:
    assert_recovered(srv)  # a normal request works, /health 200, the gauges back to 0
    idle_stats(srv.state.async_engine)
    srv.state.engine.scheduler.check_integrity()  # the loop thread is idle: safe to read


BAD = [
    ({"top_p": 1e-46}, "top_p"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"repetition_penalty": 1e-50, "top_p": 0.9}, "repetition_penalty"),
    ({"temperature": math.nan}, "temperature"),
    ({"n": 33, "seed": 2**64 - 32}, "seed"),
    ({"logit_bias": {"999999999": 5}}, "logit_bias"),  # outside the vocabulary
    ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
def test_bad_sampling_values_are_400s_and_leave_nothing(real, path, fields, param):
    srv, _ = real
    body = {"max_tokens": 4, **fields}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": USER})
    r = post(srv, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert_healthy(srv)


def test_prompt_too_long_without_max_tokens(real):
    srv, engine = real
    long = [5] * (engine.max_model_len + 10)
    r = post(srv, "/v1/completions", {"prompt": long, "max_tokens": None})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert_healthy(srv)


class _FailingSampler(Sampler):
    def __call__(self, logits, rows):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("injected sampler failure with /secret/path")
        return super().__call__(logits, rows)


def test_a_grammar_this_model_cannot_follow_says_why(real):
    """The tiny checkpoint's EOS id 1 is the text '"': a grammar whose next token must be it
    cannot continue; the 500 (and the stream's error event) carries the engine's reason, which
    it wrote for the client, instead of the generic message."""
    srv, _ = real
    body = {"max_tokens": 4, "prompt": "a", "structured_outputs": {"regex": '"'}}
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_failed" and "structured output cannot continue" in err["message"]
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as s:  # fmt: skip
        lines = [ln for ln in s.iter_lines() if ln]
    event = json.loads(lines[-2][len("data: ") :])["error"]
    assert "structured output cannot continue" in event["message"]


def test_constraints_that_ban_every_token_say_so(real):
    """allowed_token_ids whose only id is a stop id that min_tokens holds back: no token can
    be sampled. The request's own constraints contradict each other: a 400 with the engine's
    reason (not token 0, nor a 500), an error event when streamed; the server serves on."""
    srv, _ = real
    body = {"max_tokens": 4, "allowed_token_ids": [5], "stop_token_ids": [5], "min_tokens": 2}
    for path, extra in (("/v1/completions", {"prompt": "a"}),
                        ("/v1/chat/completions", {"messages": USER})):  # fmt: skip
        r = post(srv, path, {**body, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "no_token_allowed" and err["type"] == "invalid_request_error"
        assert "no token can be sampled" in err["message"]
        assert "allowed_token_ids and min_tokens" in err["message"]
    streamed = {**body, "prompt": "a", "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=streamed, timeout=60) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert "no token can be sampled" in json.loads(lines[-2][len("data: ") :])["error"]["message"]
    assert_healthy(srv)


def test_a_request_the_engine_fails_is_an_error_for_it_only(real):
    srv, engine = real
    original = engine.runner.sampler
    engine.runner.sampler = _FailingSampler()  # read by the loop thread at its next step
    try:
        for path, extra in (("/v1/completions", {"prompt": ["a", "b"]}),
                            ("/v1/chat/completions", {"messages": USER})):  # fmt: skip
            r = post(srv, path, {"max_tokens": 4, "seed": 666, **extra})
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["code"] == "generation_failed" and "secret" not in r.text
            # streamed: an error event, then [DONE]
            body = {"max_tokens": 4, "seed": 666, "stream": True, **extra}
            with httpx.stream("POST", srv.url + path, json=body, timeout=60) as s:
                lines = [ln for ln in s.iter_lines() if ln]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][len("data: ") :])["error"]["code"] == "generation_failed"
            # other requests at the same time are unaffected
            ok = post(srv, path, {"max_tokens": 4, "seed": 1, **extra})
            assert ok.status_code == 200
    finally:
        engine.runner.sampler = original
    assert_healthy(srv)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image", "image": "x.png"},
        {"type": "video", "video": "x.mp4"},
    ],
)
def test_images_without_a_vision_encoder_are_refused(real, part):
    srv, _ = real
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    r = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1]" and "vision encoder" in err["message"]
    assert_healthy(srv)


def test_logit_bias_on_both_endpoints(real):
    srv, engine = real
    tok = engine.tokenizer.encode(" la")[0]
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    for path, extra in (("/v1/completions", {"prompt": "Hi"}),
                        ("/v1/chat/completions", {"messages": USER, **off})):  # fmt: skip
        body = {"max_tokens": 3, "temperature": 0, "logit_bias": {str(tok): 100}, **extra}
        r = post(srv, path, body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice.get("text", choice.get("message", {}).get("content")) == " la" * 3
    r = post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "best_of": 1})
    assert r.status_code == 200  # best_of == n is plain sampling
    assert_healthy(srv)


def test_historical_tool_call_arguments_errors_name_the_field(real):
    srv, _ = real
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]}, *USER]
    r = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[1].tool_calls[0].function.arguments"
    assert "message 1" in err["message"] and "not valid JSON" in err["message"]
    call["function"]["arguments"] = "[" * 100_000 + "]" * 100_000  # nested past the recursion limit
    r = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert_healthy(srv)


def test_tool_call_values_with_tags_over_http():
    """Issue 11 #8 end to end (FakeEngine: a canned reply): the same call streamed and not."""
    import openai

    from server_fakes import FakeEngine, stream_chat

    code = "print('</tool_call>')\nx = '</parameter>'  # <parameter=path>"
    reply = ("Writing it.\n\n<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n"
             f"</parameter>\n<parameter=content>\n{code}\n</parameter>\n<parameter=mode>\nNone\n"
             "</parameter>\n</function>\n</tool_call>")  # fmt: skip
    props = {"path": {"type": "string"}, "content": {"type": "string"},
             "mode": {"type": ["string", "null"]}}  # fmt: skip
    tools = [{"type": "function",
              "function": {"name": "write_file", "parameters": {"type": "object",
                                                                "properties": props}}}]  # fmt: skip
    eng = FakeEngine(reply=reply, default_thinking=False)
    srv = ServerThread(create_app(eng, ServerConfig(served_model_name="tiny")))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        want = {"path": "a.py", "content": code, "mode": None}
        r = client.chat.completions.create(model="tiny", messages=USER, tools=tools)
        msg = r.choices[0].message
        assert msg.content == "Writing it." and r.choices[0].finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments) for c in msg.tool_calls] == [want]
        acc, _ = stream_chat(client, messages=USER, tools=tools)
        assert acc[0]["content"] == "Writing it." and acc[0]["finish"] == "tool_calls"
        assert [json.loads(c["arguments"]) for c in acc[0]["calls"].values()] == [want]
    finally:
        srv.close()
