"""Load: 32 concurrent streaming clients against a real server on the REAL engine (tiny random
checkpoint, real Qwen 3.5 tokenizer), plus one client that leaves mid-stream. Every client gets
exactly the tokens it asked for (ignore_eos), the leaver is aborted, and afterwards the server is
healthy with every KV block and DeltaNet state slot free again."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from qwen35.server.app import ServerConfig, create_app
from server_fakes import ServerThread, Spy, build_tiny_engine, idle_stats

NUM_CLIENTS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = build_tiny_engine(tmp_path_factory.mktemp("tiny-load"), max_num_seqs=16)
    spy = Spy(engine)
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
    yield srv, engine, spy
    srv.close()


async def _client(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None, str]:
    """One streaming client; returns (asked, usage tokens, finish_reason, text)."""
    max_tokens = 3 + (i * 7) % 29
    common = dict(
        model="tiny", max_tokens=max_tokens, stream=True, temperature=0.8, seed=i,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text, finish, usage = "", None, None
    if i % 2:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Client {i}: tell me a story."}], **common
        )
        async for ch in stream:
            for c in ch.choices:
                text += (c.delta.content or "") + (
                    getattr(c.delta, "reasoning_content", None) or ""
                )
                finish = c.finish_reason or finish
            usage = ch.usage or usage
    else:
        stream = await client.completions.create(prompt=f"Client {i} says", **common)
        async for ch in stream:
            for c in ch.choices:
                text += c.text
                finish = c.finish_reason or finish
            usage = ch.usage or usage
    return max_tokens, usage.completion_tokens, finish, text


async def _leaver(url: str) -> int:
    """Starts a long stream, reads a few events, then hangs up."""
    body = {"prompt": "A long one", "max_tokens": 400, "ignore_eos": True, "stream": True}
    seen = 0
    async with httpx.AsyncClient(timeout=60) as h:
        async with h.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
    return seen


async def _run_all(url: str):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        return await asyncio.gather(_leaver(url), *(_client(client, i) for i in range(NUM_CLIENTS)))
    finally:
        await client.close()


def test_concurrent_streams_and_disconnect(server):
    srv, engine, spy = server
    leaver_seen, *results = asyncio.run(_run_all(srv.url))
    assert leaver_seen == 3
    for asked, got, finish, _text in results:
        assert (got, finish) == (asked, "length")
    assert len({text for *_, text in results}) > 1  # distinct prompts and seeds, distinct text
    # the leaver was aborted (the only abort) and its blocks and slot came back
    deadline = time.monotonic() + 30
    while len(spy.aborted) < 1 or srv.state.async_engine.stats.get("num_running"):
        assert time.monotonic() < deadline, "the disconnected request was not aborted"
        time.sleep(0.05)
    assert len(spy.aborted) == 1
    stats = idle_stats(srv.state.async_engine)
    assert stats["kv_blocks_used"] == 0 and stats["state_slots_used"] == 0, stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not engine.has_unfinished_requests()  # read while the loop sleeps
    assert httpx.get(srv.url + "/health").status_code == 200
    metrics = httpx.get(srv.url + "/metrics").text
    assert "qwen35_kv_blocks_used 0.0" in metrics and "qwen35_state_slots_used 0.0" in metrics
    ok = 'qwen35_requests_total{endpoint="/v1/completions",status="200"}'
    assert f"{ok} {NUM_CLIENTS // 2 + 1}.0" in metrics
    # and it still serves
    r = openai.OpenAI(base_url=srv.url + "/v1", api_key="none").completions.create(
        model="tiny", prompt="again", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 4
