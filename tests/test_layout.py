"""The import rules that keep the layers apart (ARCHITECTURE.md), checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print(' '.join(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def test_engine_imports_no_server_code():
    mods = _loaded_after("import qwen35.engine; from qwen35.engine import LLMEngine, LLM")
    assert "qwen35.engine.llm_engine" in mods  # the engine itself did load
    server = sorted(m for m in mods if m.startswith(("qwen35.server", "fastapi", "uvicorn")))
    assert server == []


@pytest.mark.parametrize(
    "module",
    [
        "qwen35.engine.scheduler",
        "qwen35.engine.kv_cache",
        "qwen35.engine.state_cache",
        "qwen35.engine.config",
        "qwen35.engine.cache_sizing",
        "qwen35.plan.planner",
        "qwen35.plan.decode_bytes",
    ],
)
def test_torch_free_modules(module):
    assert "torch" not in _loaded_after(f"import {module}")
