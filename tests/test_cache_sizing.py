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
