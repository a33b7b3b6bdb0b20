"""The OpenAI-compatible server on the REAL engine: a tiny random checkpoint (vocab 248320) with
the real Qwen 3.5 tokenizer, driven over HTTP by the official `openai` client; plus the
`qwen35 serve` command line."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from qwen35.server.app import ServerConfig, create_app
from server_fakes import (
    TOOLS,
    USER,
    ServerThread,
    idle_stats,
    start_serve,
    stream_chat,
)

# ---- the command line ---------------------------------------------------------------------------


def test_serve_cli_rejects_bad_options(capsys):
    from qwen35.cli import main

    assert main(["serve", "--model", "/nonexistent", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--max-body-bytes", "lots"])
    assert "not a size" in capsys.readouterr().err


def test_serve_cli_refuses_an_address_in_use_before_loading(capsys, monkeypatch):
    """The socket is bound before the model loads: a port in use is refused at once with the
    cause (uvicorn bound it only after the engine was up: minutes for a large model)."""
    import socket

    from qwen35.cli import main
    from qwen35.engine import llm_engine

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(llm_engine, "LLMEngine", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", "/nonexistent", "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err
    assert main(["serve", "--model", "/nonexistent", "--host", "no.such.host.invalid"]) == 2
    assert "check --host" in capsys.readouterr().err


# ---- the REAL engine: tiny random checkpoint, real Qwen 3.5 tokenizer ---------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from server_fakes import Spy, build_tiny_engine

    engine = build_tiny_engine(tmp_path_factory.mktemp("tiny-real"), max_num_seqs=8)
    spy = Spy(engine)
    srv = ServerThread(
        create_app(engine, ServerConfig(served_model_name="tiny", model_path="/m/tiny"))
    )
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    yield srv, client, engine, spy
    srv.close()


def test_real_completions(real):
    srv, client, engine, _ = real
    r = client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("The capital of France is"))
    again = client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    text, usage = "", None
    for ch in client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ):  # fmt: skip
        text += "".join(c.text for c in ch.choices)
        usage = ch.usage or usage
    assert text == r.choices[0].text and usage.completion_tokens == 6
    lp = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, logprobs=3,
                                   extra_body={"ignore_eos": True}).choices[0].logprobs  # fmt: skip
    assert len(lp.tokens) == 3 and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)


def test_real_chat_stream_and_thinking(real):
    srv, client, engine, spy = real
    r = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    default = spy.last_prompt_text(engine.tokenizer)
    want = "<think>\n" if engine.default_thinking else "<think>\n\n</think>\n\n"
    assert default.endswith("<|im_start|>assistant\n" + want)
    acc, chunks = stream_chat(
        client, messages=USER, max_tokens=5, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    assert spy.last_prompt_text(engine.tokenizer).endswith("assistant\n<think>\n\n</think>\n\n")
    assert chunks[-1].usage.completion_tokens == 5 and acc[0]["finish"] == "length"
    assert acc[0]["reasoning"] == ""  # thinking off: everything is content
    client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )  # fmt: skip
    assert spy.last_prompt_text(engine.tokenizer).endswith("<|im_start|>assistant\n<think>\n")


def test_real_tool_round_trip(real):
    srv, client, engine, spy = real
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]  # fmt: skip
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = spy.last_prompt_text(engine.tokenizer)
    assert "<tools>\n" + json.dumps(TOOLS[0]) in prompt
    assert "</IMPORTANT>\n\nYou are a weather bot.<|im_end|>" in prompt
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in prompt


def test_real_errors(real):
    srv, client, engine, _ = real
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello " * 100, max_tokens=500)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and "too many" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[engine.config.vocab_size + 5], max_tokens=2)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "developer", "content": "x"}]
        )
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    assert client.completions.create(model="/m/tiny", prompt="x", max_tokens=2).choices
    stats = idle_stats(srv.state.async_engine)
    assert stats["kv_blocks_used"] == 0 and stats["state_slots_used"] == 0


@pytest.mark.slow
def test_serve_command_in_a_subprocess(tmp_path):
    import signal

    from tiny import VOCAB_REAL, save_checkpoint

    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    proc, url = start_serve(tmp_path / "m", "--served-model-name", "tiny", "claude-x",
                            "--api-key", "k", "--max-memory", "256MiB", "--log-level", "warning",
                            timeout=120)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.completions.create(model="tiny", prompt="Hi", max_tokens=3,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        assert r.usage.completion_tokens == 3
        assert httpx.get(url + "/v1/models").status_code == 401
        # Anthropic's client, its key header and a second served name
        import anthropic

        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        m = c.messages.create(model="claude-x", max_tokens=3,
                              messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
        assert m.model == "tiny" and m.usage.output_tokens <= 3
    finally:
        proc.terminate()
        status = proc.wait(30)
    # a clean stop: uvicorn re-raises the signal once shut down (only an engine failure exits 1)
    assert status in (0, -signal.SIGTERM), status


def test_multi_step_server_streams_rounds_with_single_steps_text(real, tmp_path):
    """A server whose engine runs 4 decode steps a round (--num-scheduler-steps 4): completions,
    streamed or not, with a stop string met inside a round, give the single-step server's text;
    the stream arrives in rounds of tokens."""
    from server_fakes import serving_tiny_engine

    _, client1, _, _ = real  # (the same checkpoint: build_tiny_engine's fixed seed)
    gen = serving_tiny_engine(tmp_path / "k4", max_num_seqs=8, num_scheduler_steps=4)
    srv, client4, engine = next(gen)
    try:
        assert engine.runner.decode_steps == 4
        kw = dict(model="tiny", prompt="The capital of France is", max_tokens=11, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
        one = client1.completions.create(**kw).choices[0].text
        assert client4.completions.create(**kw).choices[0].text == one
        pieces = [ch.choices[0].text for ch in client4.completions.create(**kw, stream=True)
                  if ch.choices and ch.choices[0].text]  # fmt: skip
        assert "".join(pieces) == one and len(pieces) < 11  # fewer chunks than tokens
        stop = one[len(one) // 2 : len(one) // 2 + 2]
        a = client1.completions.create(**kw, stop=[stop]).choices[0]
        b = client4.completions.create(**kw, stop=[stop]).choices[0]
        assert (b.text, b.finish_reason) == (a.text, a.finish_reason) == (one[: one.index(stop)],
                                                                          "stop")  # fmt: skip
    finally:
        next(gen, None)


def test_a_closed_app_lets_its_engine_go(tmp_path):
    """Once its app has served and shut down, nothing keeps the engine alive: FastAPI caches
    what it learns of each endpoint function in module-level lru_caches, and the routes were
    closures over the engine (a process serving app after app, as the tests do, kept every
    engine: ~50 MB each with the real vocabulary)."""
    import gc
    import weakref

    from server_fakes import build_tiny_engine, serving

    gen = serving()
    start = next(gen)
    engine = build_tiny_engine(tmp_path / "tiny")
    gone = weakref.ref(engine)
    srv, _ = start(engine)
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": USER, "max_tokens": 2})):  # fmt: skip
        assert httpx.post(srv.url + path, json=body, timeout=30).status_code == 200
    for path in ("/health", "/v1/models", "/metrics", "/tokenizer_info"):
        assert httpx.get(srv.url + path, timeout=30).status_code == 200
    next(gen, None)  # the servers close
    del engine, srv, start, gen
    gc.collect()
    assert gone() is None
