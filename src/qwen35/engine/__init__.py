"""The serving engine: scheduler, cache pools, model runner and sampler, and the `LLM` API.

Names load lazily, so `qwen35.engine.forward_batch` (the runner <-> model contract, imported by
the models) does not pull in the whole engine.
"""

from __future__ import annotations

_LAZY = {
    "LLM": "qwen35.engine.llm_engine",
    "LLMEngine": "qwen35.engine.llm_engine",
    "PromptTooLongError": "qwen35.engine.llm_engine",
    "EngineConfig": "qwen35.engine.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen35.engine' has no attribute {name!r}")


__all__ = list(_LAZY)
