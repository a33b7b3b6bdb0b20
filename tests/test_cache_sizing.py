"""engine/cache_sizing.py's GPU-only piece, `measure_working_memory`, run on a CPU with the CUDA
memory counters stubbed: the prefill it measures must build and run (on a GPU it runs inside
every engine's start, before any test or benchmark gets to the model)."""

from __future__ import annotations

import torch

from qwen35.engine.cache_sizing import measure_working_memory
from test_backend import _model


def test_measure_working_memory_runs_its_prefill(monkeypatch):
    calls = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda *a, **k: calls.append("sync"))
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a, **k: 1000)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a, **k: calls.append("reset"))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a, **k: 1000 + 4096)
    monkeypatch.setattr(cuda, "empty_cache", lambda *a, **k: None)
    model = _model()
    got = measure_working_memory(model, chunk_tokens=40, sampled_rows=3, block_size=16)
    assert got == 4096 + 3 * model.config.vocab_size * 4 * 2
    assert calls == ["sync", "reset", "sync"]


def test_a_context_the_cache_cannot_hold_says_where_the_memory_went():
    import pytest

    from qwen35.engine.cache_sizing import plan_caches
    from qwen35.errors import Qwen35Error

    cfg = _model().config
    kw = dict(model_dtype=torch.float32, device="cpu", max_memory="3MiB", max_num_seqs=4,
              max_num_batched_tokens=64, block_size=16, enable_prefix_caching=True,
              prefix_cache_memory=None, weight_bytes=1 << 20)  # fmt: skip
    cap = plan_caches(cfg, max_model_len=None, **kw).kv_tokens
    assert 16 <= cap < cfg.max_position_embeddings  # the budget, not the model, limits it
    why = (rf"--max-model-len {cap + 16} needs {cap + 16} KV tokens but the cache holds {cap} "
           r"\(--max-memory 3.0 MiB = weights 1.0 MiB \+ working memory [\d,]+ B "
           r"\(--max-num-batched-tokens 64, --max-num-seqs 4\) \+ DeltaNet states of 4 sequences "
           r"[\d,]+ B \+ prefix-cache state checkpoints [\d,]+ B \+ KV [\d,]+ B\); raise --max-memory, "
           r"or lower --max-model-len, --max-num-seqs or --max-num-batched-tokens")  # fmt: skip
    with pytest.raises(Qwen35Error, match=why):
        plan_caches(cfg, max_model_len=cap + 16, **kw)
    assert plan_caches(cfg, max_model_len=cap, **kw).max_model_len == cap


def test_the_log_line_says_what_the_cache_allows():
    from qwen35.engine.cache_sizing import CachePlan

    def plan(blocks, slots, max_len):
        return CachePlan(num_blocks=blocks, block_size=16, num_state_slots=slots,
                         num_checkpoint_slots=2, checkpoint_interval=256, max_model_len=max_len,
                         kv_bytes_per_token=100, state_bytes_per_sequence=1000,
                         cache_bytes=0).describe()  # fmt: skip

    line = plan(1024, 8, 4096)  # 16,384 tokens: four at the longest
    assert "one sequence of up to 4096 tokens, or 4 concurrent sequences at that length" in line
    line = plan(1024, 32, 16384)  # one at the longest: what 32 at once leave each
    assert line.endswith("one sequence of up to 16384 tokens, or 32 concurrent sequences of 512 "
                         "tokens each")  # fmt: skip


def test_a_budget_below_one_state_slot_is_refused_not_a_dead_engine():
    """A --max-memory just above weights + working memory: the one DeltaNet state slot kept
    whatever the budget does not fit. Refused with the numbers (an engine with -1 prefix-cache
    checkpoints and an empty state pool died at start with an IndexError before); any larger
    budget that is taken gives a usable pool."""
    import pytest

    from qwen35.engine.cache_sizing import plan_caches
    from qwen35.errors import Qwen35Error
    from qwen35.plan.planner import working_memory_bytes

    cfg = _model().config
    kw = dict(model_dtype=torch.float32, device="cpu", max_num_seqs=4, max_num_batched_tokens=64,
              block_size=16, enable_prefix_caching=True, prefix_cache_memory=None,
              weight_bytes=1 << 20, max_model_len=None)  # fmt: skip
    base = (1 << 20) + working_memory_bytes(cfg, 64, 4, dtype="float32")
    slot = plan_caches(cfg, max_memory="3MiB", **kw).state_bytes_per_sequence
    with pytest.raises(Qwen35Error, match="not even one sequence's DeltaNet state"):
        plan_caches(cfg, max_memory=base + slot // 2, **kw)
    taken = 0
    for extra in range(1, 8 * slot, 499):
        try:
            p = plan_caches(cfg, max_memory=base + extra, **kw)
        except Qwen35Error:
            continue
        taken += 1
        assert p.num_state_slots >= 1 and p.num_checkpoint_slots >= 0 and p.num_blocks >= 1
    assert taken
