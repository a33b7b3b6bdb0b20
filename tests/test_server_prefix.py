"""Prefix caching through the server (issue 6): a multi-turn chat reuses its history."""

from __future__ import annotations

import httpx
import pytest

from server_fakes import serving_tiny_engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serving_tiny_engine(tmp_path_factory.mktemp("tiny-prefix"), max_num_seqs=4)


def test_multi_turn_chat_hits_its_history(served):
    srv, client, engine = served
    system = "You are a careful assistant. " * 20  # ~120 tokens shared by every turn
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "First question?"}]
    prompt_tokens, cached = [], []
    for turn in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=5, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        prompt_tokens.append(r.usage.prompt_tokens)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)  # (OpenAI's field)
        msgs += [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                 {"role": "user", "content": f"Follow-up number {turn}?"}]  # fmt: skip
    stats = engine.get_stats()
    bs = engine.scheduler.config.block_size
    # turns 2 and 3 each reuse (almost) all of the previous turn's prompt
    assert stats["prefix_cache_hits"] >= 2
    assert cached[0] == 0 and sum(cached) == stats["prefix_cache_hit_tokens"]
    assert all(c >= (p // bs - 2) * bs for c, p in zip(cached[1:], prompt_tokens, strict=False))
    assert stats["prefix_cache_hit_tokens"] >= sum((p // bs - 2) * bs for p in prompt_tokens[:2])
    metrics = httpx.get(srv.url + "/metrics").text
    line = next(
        x for x in metrics.splitlines() if x.startswith("qwen35_prefix_cache_hit_tokens_total")
    )
    assert float(line.split()[-1]) == stats["prefix_cache_hit_tokens"]
