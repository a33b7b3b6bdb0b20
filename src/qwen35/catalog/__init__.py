"""Bundled official configs of the Qwen 3.5 family (and their FP8 variants).

`model_names()` lists them; `load_model_config(name)` resolves a name loosely ("Qwen3.5-27B",
"qwen3.5-27b", "27B", "Qwen/Qwen3.5-27B-FP8") and suggests close names when it can't.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import resources

from qwen35.config import ConfigError, ModelConfig

_DIR = resources.files(__package__) / "models"


class UnknownNameError(ConfigError):
    """A model or GPU name not in a catalog; the message carries "did you mean" suggestions."""


def did_you_mean(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")


@lru_cache(maxsize=1)
def model_names() -> list[str]:
    """Base (BF16) model names first in size order, then FP8 variants."""
    names = [p.name[: -len(".json")] for p in _DIR.iterdir() if p.name.endswith(".json")]
    base = [n for n in names if not n.endswith("-FP8")]
    order = ["0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B", "397B-A17B"]

    def key(n: str) -> int:
        tail = n.removeprefix("Qwen3.5-").removesuffix("-FP8")
        return order.index(tail) if tail in order else len(order)

    return sorted(base, key=key) + sorted((n for n in names if n.endswith("-FP8")), key=key)


def base_model_names() -> list[str]:
    return [n for n in model_names() if not n.endswith("-FP8")]


def resolve_name(name: str) -> str:
    """Canonical catalog name for a loose spelling; raises UnknownNameError."""
    known = model_names()
    q = name.strip().split("/")[-1].lower()
    for n in known:
        low = n.lower()
        if q in (low, low.removeprefix("qwen3.5-")):
            return n
    raise did_you_mean("model", name, known)


def load_raw(name: str) -> dict:
    """A fresh copy of the bundled config.json dict (callers may modify it)."""
    return json.loads((_DIR / f"{resolve_name(name)}.json").read_text())


def load_model_config(name: str) -> ModelConfig:
    canonical = resolve_name(name)
    return ModelConfig.from_hf(load_raw(canonical), name=canonical)


def has_fp8_release(name: str) -> bool:
    canonical = resolve_name(name).removesuffix("-FP8")
    return f"{canonical}-FP8" in model_names()
