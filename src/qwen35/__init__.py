"""qwen35: plan and run the Qwen 3.5 model family.

Heavy parts (torch) load lazily so `qwen35 plan` and `import qwen35` stay fast.
"""

from __future__ import annotations

from qwen35._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "load_model": "qwen35.loader",
    "LLM": "qwen35.engine",
    "SamplingParams": "qwen35.request",
    "ModelConfig": "qwen35.config",
}


__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = list(_LAZY)
