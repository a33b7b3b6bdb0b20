"""Per-request limits and queue admission (issue 11, defect 3), on the FakeEngine: every limit is
a 400 naming the field, every 503 carries Retry-After, --max-queue counts sequences, and after
each refusal the server serves normally with nothing left queued or allocated."""

from __future__ import annotations

import threading

import httpx
import pytest

from qwen35.errors import Qwen35Error
from qwen35.server.app import ServerConfig
from qwen35.server.limits import RequestLimits
from server_fakes import (
    USER,
    FakeEngine,
    assert_openai_error,
    assert_recovered,
    serving,
    wait_until,
)


@pytest.fixture
def serve():
    yield from serving()


CHAT, CMPL = "/v1/chat/completions", "/v1/completions"

OVER_LIMITS = [
    (CMPL, {"prompt": "x", "n": 129}, "n", None),
    (CHAT, {"messages": USER, "n": 10**7}, "n", None),
    (CMPL, {"prompt": ["x"] * 129}, "prompt", None),
    (CMPL, {"prompt": [[1, 2]] * 4, "n": 64}, "n", None),  # 256 sequences
    (CMPL, {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop", None),
    (CHAT, {"messages": USER, "stop": "y" * 129}, "stop", None),
    (CMPL, {"prompt": "x", "stop_token_ids": list(range(17))}, "stop_token_ids", None),
    (CMPL, {"prompt": "x", "logprobs": 21}, "logprobs", None),
    (CMPL, {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", None),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    (CMPL, {"prompt": list(range(600))}, "prompt", "context_length_exceeded"),
    (CMPL, {"prompt": [[1], list(range(600))]}, "prompt", "context_length_exceeded"),
    (CMPL, {"prompt": "word " * 600}, "prompt", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 600}]}, "messages",
     "context_length_exceeded"),
]  # fmt: skip


def test_limits_are_400s_naming_the_field(serve):
    srv, _ = serve(FakeEngine(max_model_len=512))
    for path, body, param, code in OVER_LIMITS:
        r = httpx.post(srv.url + path, json={"max_tokens": 2, **body})
        err = assert_openai_error(r, 400, param, code if code else "?")
        assert any(w in err["message"] for w in ("limit", "at most", "[0, 20]", "context")), err
    assert_recovered(srv)


def test_at_the_limits_is_accepted(serve):
    eng = FakeEngine(max_num_seqs=256)
    srv, client = serve(eng)
    r = client.completions.create(model="tiny", prompt="x", n=128, max_tokens=1)
    assert len(r.choices) == 128
    r = client.completions.create(model="tiny", prompt=[[1, 2]] * 2, n=64, max_tokens=1)
    assert len(r.choices) == 128
    stops = [f"stop{i}" for i in range(15)] + ["z" * 128]
    r = client.completions.create(model="tiny", prompt="x", max_tokens=1, stop=stops)
    assert eng.added[-1][2].stop == stops
    assert_recovered(srv)


def test_limits_are_configurable(serve):
    limits = RequestLimits(max_seqs_per_request=4, max_stop=2, max_prompt_tokens=8)
    srv, _ = serve(FakeEngine(), limits=limits)
    r = httpx.post(srv.url + CMPL, json={"prompt": "x", "n": 5})
    assert "--max-seqs-per-request" in assert_openai_error(r, 400, "n")["message"]
    assert_openai_error(httpx.post(srv.url + CMPL, json={"prompt": "x", "stop": ["a", "b", "c"]}),
                        400, "stop")  # fmt: skip
    r = httpx.post(srv.url + CMPL, json={"prompt": "word " * 20})
    err = assert_openai_error(r, 400, "prompt", "prompt_too_long")
    assert "--max-prompt-tokens" in err["message"]
    assert httpx.post(srv.url + CMPL, json={"prompt": "x", "n": 4, "max_tokens": 1}).is_success
    assert_recovered(srv)
    with pytest.raises(Qwen35Error, match="--max-stop"):
        RequestLimits(max_stop=0)


def test_max_queue_counts_sequences_and_sends_retry_after(serve):
    eng = FakeEngine(max_num_seqs=1)
    srv, _ = serve(eng, max_queue=2)
    eng.gate.clear()  # the loop blocks inside step() with request A running
    results = []

    def post(body):
        results.append(httpx.post(srv.url + CMPL, json={"max_tokens": 2, **body}, timeout=30))

    a = threading.Thread(target=post, args=({"prompt": "a"},))
    a.start()
    wait_until(lambda: len(eng.added) == 1)
    b = threading.Thread(target=post, args=({"prompt": "b", "n": 2},))  # 2 waiting sequences
    b.start()
    wait_until(lambda: srv.state.async_engine.num_waiting() == 2)
    for body in ({"prompt": "c"}, {"prompt": ["c", "d"]}):
        r = httpx.post(srv.url + CMPL, json=body)
        err = assert_openai_error(r, 503, code="queue_full")
        assert r.headers["retry-after"] == "1" and "sequences" in err["message"]
    # more sequences than slots + queue can never be admitted: a 400, not a 503 forever
    r = httpx.post(srv.url + CMPL, json={"prompt": "x", "n": 4})
    assert_openai_error(r, 400, "n", "request_too_large")
    eng.gate.set()
    a.join(30)
    b.join(30)
    assert [r.status_code for r in results] == [200, 200]
    assert_recovered(srv)


def test_max_queue_on_an_idle_server_admits_what_fits(serve):
    srv, _ = serve(FakeEngine(max_num_seqs=8), max_queue=2)
    assert httpx.post(srv.url + CMPL, json={"prompt": "x", "n": 10, "max_tokens": 1}).is_success
    r = httpx.post(srv.url + CMPL, json={"prompt": "x", "n": 11, "max_tokens": 1})
    assert_openai_error(r, 400, "n", "request_too_large")
    assert_recovered(srv)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_queue_zero_is_refused_with_a_message(bad):
    with pytest.raises(Qwen35Error, match="--max-queue must be an integer >= 1"):
        ServerConfig(served_model_name="m", max_queue=bad)


def test_serve_cli_rejects_bad_limits():
    from qwen35.cli import main

    assert main(["serve", "--model", "x", "--max-queue", "0"]) != 0
    assert main(["serve", "--model", "x", "--timeout-headers", "0"]) != 0
    assert main(["serve", "--model", "x", "--max-seqs-per-request", "0"]) != 0
