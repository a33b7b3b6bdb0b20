"""The serving engine: scheduler, cache pools, model runner and sampler, and the `LLM` API.

Names load lazily, so `qwen35.engine.forward_batch` (the runner <-> model contract, imported by
the models) does not pull in the whole engine.
"""

from __future__ import annotations

from qwen35._lazy import lazy_exports

_LAZY = {
    "LLM": "qwen35.engine.llm_engine",
    "LLMEngine": "qwen35.engine.llm_engine",
    "PromptTooLongError": "qwen35.engine.llm_engine",
    "EngineConfig": "qwen35.engine.config",
}


__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = list(_LAZY)
