"""Seeded fuzzing of the POST endpoints (issue 11): a few hundred randomized bad requests (wrong types,
extreme numbers, NaN, deep nesting, lone surrogates, huge lists, broken JSON and encodings,
bad keys, streaming or not) on loopback. No answer may be a 5xx, every error is in OpenAI's
shape, every stream ends with [DONE], and afterwards the engine is alive with nothing left
running, queued or allocated. The fast test drives the FakeEngine; the slow one the real engine
on a tiny random checkpoint."""

from __future__ import annotations

import json
import random
import socket

import httpx
import pytest

from server_fakes import (
    TOOLS,
    USER,
    FakeEngine,
    assert_recovered,
    build_tiny_engine,
    serving,
)

KEY = "sekret"
FIELDS = [
    "model", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", "top_logprobs", "echo", "suffix", "stream",
    "stream_options", "ignore_eos", "min_tokens", "include_stop_str_in_output",
    "skip_special_tokens", "user", "tools", "tool_choice", "chat_template_kwargs",
    "response_format", "parallel_tool_calls", "logit_bias", "best_of", "prompt", "messages",
    "prompt_logprobs", "tokens", "add_special_tokens", "return_token_strs", "input",
    "instructions", "max_output_tokens", "text", "reasoning", "previous_response_id",
    "lora_name", "lora_path", "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
    "priority", "add_generation_prompt", "continue_final_message", "include_reasoning",
    "return_token_ids", "return_tokens_as_token_ids", "use_beam_search", "cache_salt",
    "system", "stop_sequences", "thinking", "output_config", "metadata", "chat_template",
    "documents", "mm_processor_kwargs", "reasoning_effort", "thinking_token_budget",
    "options", "format", "think", "images", "raw", "context", "keep_alive", "template", "name",
    "unknown_field",
]  # fmt: skip


def _nested(rng: random.Random, depth: int):
    x = rng.choice([1, "a", None])
    for _ in range(depth):
        x = [x] if rng.random() < 0.5 else {"k": x}
    return x


def _value(rng: random.Random):
    """A random JSON value, mostly wrong for whatever field receives it."""
    pool = [
        lambda: None, lambda: True, lambda: False, lambda: 0, lambda: -1, lambda: 1,
        lambda: 2**64, lambda: -(2**63), lambda: 10**30, lambda: 1e308, lambda: -1e-320,
        lambda: float("nan"), lambda: float("inf"), lambda: -float("inf"), lambda: 1e-46,
        lambda: rng.uniform(-5, 5), lambda: "", lambda: "x" * rng.randint(1, 3000),
        lambda: "\ud800", lambda: "a\udfffb", lambda: "ünïcødé 🙂", lambda: "<tool_call>",
        lambda: [], lambda: [rng.randint(-5, 300_000) for _ in range(rng.randint(1, 40))],
        lambda: ["s"] * rng.randint(1, 300), lambda: [[]], lambda: [None], lambda: {},
        lambda: {"a": 1}, lambda: {"type": "function", "function": {"name": 3}},
        lambda: _nested(rng, rng.choice([3, 40, 70, 300])),
        lambda: [{"role": "user", "content": _value(rng)}],
        lambda: [{"role": rng.choice(["user", "system", "tool", "assistant", "x"]),
                  "content": rng.choice(["hi", None, [{"type": "text", "text": "t"}],
                                         [{"type": "image_url", "image_url": {"url": "x"}}]])}],
        lambda: [{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": rng.choice(["{", "[]", "1", '{"a":1}'])}}]}],
    ]  # fmt: skip
    return rng.choice(pool)()


def _body(rng: random.Random) -> tuple[str, bytes]:
    r = rng.random()
    chat = r < 0.45
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"messages": USER} if chat else {"prompt": "Hello"}
    body["max_tokens"] = rng.choice([1, 2, 4])
    if r > 0.95:  # run-time LoRA adapters
        path = rng.choice(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
        body = {"lora_name": "x", "lora_path": "/nonexistent"}
    elif r > 0.9:  # the tokenizer endpoints
        path = rng.choice(["/tokenize", "/detokenize"])
        body = {"prompt": "Hello"} if path == "/tokenize" else {"tokens": [9707, 11]}
    elif r > 0.8:  # the Responses API
        path, body = "/v1/responses", {"input": "Hello", "max_output_tokens": 2}
    elif r > 0.72:  # Anthropic's Messages API
        path = rng.choice(["/v1/messages", "/v1/messages", "/v1/messages/count_tokens"])
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    elif r > 0.64:  # Ollama's API (streams unless "stream": false)
        path = rng.choice(["/api/chat", "/api/chat", "/api/generate", "/api/show"])
        body = {"model": "tiny", "options": {"num_predict": 2}, "stream": rng.random() < 0.5,
                **({"messages": USER} if path == "/api/chat" else {"prompt": "Hello"})}
    if rng.random() < 0.3:
        body["stream"] = True
    if chat and rng.random() < 0.2:
        body["tools"] = TOOLS
    for name in rng.sample(FIELDS, rng.randint(1, 3)):
        body[name] = _value(rng)
    raw = json.dumps(body).encode()  # NaN / Infinity as JSON5-style literals, as clients send
    r = rng.random()
    if r < 0.05:
        raw = raw[: rng.randint(0, len(raw) - 1)]  # truncated
    elif r < 0.08:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # garbage
    elif r < 0.10:
        raw = raw.replace(b'"', b"\xff", 1)  # invalid UTF-8
    elif r < 0.12:
        raw = rng.choice([b"", b"null", b"[]", b"1", b'"s"', b"[" * 5000 + b"]" * 5000])
    return path, raw


def _auth(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.9:
        return b"Bearer " + KEY.encode()
    return rng.choice([b"Bearer \xff\xfe", "Bearer ключ".encode(), b"bearer", b"Basic abc", b""])


def _client() -> httpx.Client:
    # TCP_NODELAY: httpx writes headers and body separately; without it each request waits for
    # a delayed ACK (~40 ms on Linux)
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=nodelay), timeout=60)


def _fuzz(srv, seed: int, count: int) -> dict[int, int]:
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    with _client() as client:
        for i in range(count):
            path, raw = _body(rng)
            headers = {"content-type": "application/json", "authorization": _auth(rng)}
            with client.stream("POST", srv.url + path, content=raw, headers=headers) as r:
                text = r.read().decode("utf-8", "replace")
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (i, path, raw[:300], r.status_code, text[:500])
            anthropic = path.startswith("/v1/messages")  # (Anthropic's shapes)
            if r.status_code >= 400 and path.startswith("/api/"):  # (Ollama's)
                assert set(json.loads(text)) == {"error"}, (i, text)
            elif r.status_code >= 400:
                body = json.loads(text)
                err = body["error"]
                if anthropic:
                    assert body["type"] == "error" and set(err) == {"type", "message"}, (i, text)
                else:
                    assert set(err) == {"message", "type", "param", "code"}, (i, text)
            elif r.headers["content-type"].startswith("application/x-ndjson"):
                lines = [json.loads(ln) for ln in text.split("\n") if ln]
                assert lines[-1].get("done") is True, (i, raw[:300], text[-500:])
                assert not any("error" in x for x in lines), (i, raw[:300], text[-500:])
            elif r.headers["content-type"].startswith("text/event-stream"):
                lines = [ln for ln in text.split("\n") if ln]
                last = "data: [DONE]" if not anthropic else 'data: {"type": "message_stop"}'
                assert lines[-1] == last, (i, raw[:300], text[-500:])
                events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
                assert not any(e.get("error") for e in events), (i, raw[:300], text[-500:])
    return statuses


def test_fuzz_fake_engine():
    gen = serving()
    start = next(gen)
    try:
        srv, _ = start(FakeEngine(), api_key=KEY)
        statuses = _fuzz(srv, seed=1234, count=240)
        assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100, statuses
        assert srv.state.async_engine.alive
        assert_recovered(srv, headers={"authorization": f"Bearer {KEY}"})
    finally:
        gen.close()


@pytest.mark.slow
def test_fuzz_real_engine(tmp_path):
    gen = serving()
    start = next(gen)
    try:
        srv, _ = start(build_tiny_engine(tmp_path / "tiny", enable_lora=True), api_key=KEY)
        statuses = _fuzz(srv, seed=99, count=150)
        assert statuses.get(200, 0) > 10, statuses
        assert srv.state.async_engine.alive
        assert_recovered(srv, headers={"authorization": f"Bearer {KEY}"})
    finally:
        gen.close()
