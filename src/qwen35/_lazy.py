"""Package names that load their module on first use (keeps `import qwen35` and `qwen35 plan`
free of torch, and lets models import the engine's contract without the engine)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__`: `table` maps each exported name to the module defining it."""

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
