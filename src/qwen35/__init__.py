"""qwen35: plan and run the Qwen 3.5 model family.

Heavy parts (torch) load lazily so `qwen35 plan` and `import qwen35` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "qwen35.loader",
    "LLM": "qwen35.engine",
    "SamplingParams": "qwen35.request",
    "ModelConfig": "qwen35.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen35' has no attribute {name!r}")


__all__ = list(_LAZY)
