"""Hostile and broken input (issue 11, defects 1, 4, 7 and the event-loop half of 5), on the
FakeEngine: deep JSON, lone surrogates, non-ASCII keys, internal errors and a dying engine. Each
client mistake is a 4xx in OpenAI's shape; an internal error is a generic 500 (or stream error
event) with a request id and no exception text; afterwards the server serves normally."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from qwen35.server.app import ServerConfig, create_app
from qwen35.server.transport import TransportLimits, run_server, uvicorn_config
from server_fakes import (
    TOOLS,
    USER,
    FakeEngine,
    assert_openai_error,
    assert_recovered,
    loopback_socket,
    serving,
    wait_until,
)


@pytest.fixture
def serve():
    yield from serving()


CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
DEEP = 100_000


def _post(srv, path: str, raw: str | bytes, **kw) -> httpx.Response:
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(srv.url + path, content=raw, headers=headers, timeout=30, **kw)


def _deep_args(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_deeply_nested_json_is_400(serve):
    srv, _ = serve(FakeEngine())
    user = json.dumps(USER)
    cases = [
        (CHAT, "[" * DEEP + "]" * DEEP),  # the body itself
        (CHAT, '{"messages":' + "[" * DEEP + "]" * DEEP + "}"),
        (CHAT, '{"messages":' + user + ',"chat_template_kwargs":' + _deep_args(DEEP) + "}"),
        (CHAT, '{"messages":' + user + ',"chat_template_kwargs":' + _deep_args(70) + "}"),
        (CMPL, '{"prompt":' + "[" * DEEP + "]" * DEEP + "}"),
    ]
    for path, raw in cases:
        err = assert_openai_error(_post(srv, path, raw), 400, code="nested_too_deeply")
        assert "nests deeper" in err["message"]
    # tool-call arguments are a JSON string inside the body: parsed only when rendering
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": _deep_args(DEEP)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]  # fmt: skip
    r = httpx.post(srv.url + CHAT, json={"messages": history, "tools": TOOLS}, timeout=30)
    assert_openai_error(r, 400, "messages", "nested_too_deeply")
    assert_recovered(srv)


def test_lone_surrogates_are_400_not_encode_errors(serve):
    srv, _ = serve(FakeEngine())
    cases = [
        (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (CHAT, '{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages[0].content"),
        (CMPL, '{"prompt": "x\\udc00", "echo": true, "max_tokens": 2}', "prompt"),
        (CMPL, '{"prompt": ["ok", "\\ud83d"], "stream": true}', "prompt[1]"),
        (CMPL, '{"prompt": "x", "stop": ["\\udc00"]}', "stop[0]"),
        (CMPL, '{"prompt": "x", "\\ud800": 1}', "\ud800"),
    ]
    for path, raw, param in cases:
        r = _post(srv, path, raw)
        err = assert_openai_error(r, 400)
        assert "surrogate" in err["message"], err
        if param != "\ud800":
            assert err["param"] == param, err
    # a real (paired) surrogate escape is just an emoji
    r = _post(srv, CMPL, '{"prompt": "\\ud83d\\ude00", "echo": true, "max_tokens": 1}')
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\U0001f600")
    assert_recovered(srv)


def test_non_ascii_bearer_token_is_401_without_a_traceback(serve, caplog):
    srv, _ = serve(FakeEngine(), api_key="sekret")
    with caplog.at_level(logging.WARNING):
        for token in ("ключ".encode(), b"\xff\xfe", "sekretä".encode()):
            r = httpx.get(srv.url + "/v1/models", headers={"authorization": b"Bearer " + token})
            assert_openai_error(r, 401, code="invalid_api_key")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_recovered(srv, headers={"authorization": "Bearer sekret"})


def test_internal_error_is_a_generic_500_with_a_request_id(serve, caplog, monkeypatch):
    eng = FakeEngine()
    srv, _ = serve(eng)

    def boom(*_a, **_k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(type(srv.state), "token_text", boom)
    with caplog.at_level(logging.ERROR, logger="qwen35.server"):
        r = httpx.post(srv.url + CMPL, json={"prompt": "x", "max_tokens": 2, "logprobs": 1})
        err = assert_openai_error(r, 500, None, "internal_error")
        rid = r.headers["x-request-id"]
        assert rid in err["message"] and "secret" not in r.text and "RuntimeError" not in r.text
        # streaming: the failure is an error event, then [DONE]
        body = {"prompt": "x", "max_tokens": 2, "logprobs": 1, "stream": True}
        with httpx.stream("POST", srv.url + CMPL, json=body) as s:
            assert s.status_code == 200
            lines = [ln for ln in s.iter_lines() if ln]
            srid = s.headers["x-request-id"]
    assert lines[-1] == "data: [DONE]"
    event = json.loads(lines[-2].removeprefix("data: "))
    assert event["error"]["code"] == "internal_error" and srid in event["error"]["message"]
    assert "secret" not in "".join(lines)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert rid in logged and srid in logged  # the details are in the log
    monkeypatch.undo()
    assert_recovered(srv)


def test_models_root_is_the_served_name(serve):
    srv, client = serve(FakeEngine(), model_path="/secret/path/to/model")
    card = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert card["id"] == card["root"] == "tiny" and "/secret" not in json.dumps(card)


def test_heavy_request_work_runs_on_worker_threads(serve):
    """Rendering and tokenizing (and parsing) leave the event loop and the engine thread."""
    eng = FakeEngine()
    threads: dict[str, str] = {}
    render, encode = eng.chat_template.render, eng.tokenizer.encode

    def spy_render(*a, **k):
        threads["render"] = threading.current_thread().name
        return render(*a, **k)

    def spy_encode(*a, **k):
        threads["encode"] = threading.current_thread().name
        return encode(*a, **k)

    eng.chat_template.render, eng.tokenizer.encode = spy_render, spy_encode
    srv, client = serve(eng)
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert set(threads) == {"render", "encode"}
    assert all(name.startswith("qwen35-worker") for name in threads.values()), threads


def test_dead_engine_health_shows_no_exception_text(serve):
    eng = FakeEngine()
    srv, _ = serve(eng)
    eng.fail_next_step = True
    eng.step_error = "secret-detail-xyz"
    r = httpx.post(srv.url + CMPL, json={"prompt": "x", "max_tokens": 3})
    assert_openai_error(r, 503, code="engine_dead")
    h = httpx.get(srv.url + "/health")
    err = assert_openai_error(h, 503, code="engine_dead")
    assert h.headers["retry-after"] == "1"
    for text in (r.text, h.text):
        assert "secret-detail" not in text and "RuntimeError" not in text
    assert "shutting down" in err["message"]


def test_engine_death_stops_the_server_with_status_1():
    """A dead engine loop must not leave a live process answering 503 forever: run_server
    (what `qwen35 serve` runs) returns 1 once the loop dies, after ending open streams with an
    error event and [DONE]."""
    eng = FakeEngine()
    eng.step_delay = 0.01
    app = create_app(eng, ServerConfig(served_model_name="tiny"))
    sock = loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cfg = uvicorn_config(app, TransportLimits(), log_level="critical")
    status: list[int] = []
    t = threading.Thread(target=lambda: status.append(run_server(app, cfg, [sock])), daemon=True)
    t.start()
    wait_until(lambda: _healthy(url))
    body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + CMPL, json=body, timeout=30) as r:
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3:
                eng.fail_next_step = True
    assert lines[-1] == "data: [DONE]" and "engine_dead" in lines[-2]
    t.join(30)
    assert not t.is_alive() and status == [1]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False
