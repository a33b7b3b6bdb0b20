"""engine/runtime.py: the process-wide CPU settings the engine makes at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwen35.engine import runtime


def test_onednn_cache_limited_unless_the_user_set_it(monkeypatch):
    cap = str(runtime.ONEDNN_CACHE_CAPACITY)
    for env in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(env, raising=False)
    assert runtime.limit_onednn_cache() == runtime.ONEDNN_CACHE_CAPACITY
    assert os.environ["LRU_CACHE_CAPACITY"] == cap  # ideep's too
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "9")
    assert runtime.limit_onednn_cache() == 7  # the user's values stand
    assert os.environ["LRU_CACHE_CAPACITY"] == "9"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "many")
    assert runtime.limit_onednn_cache() == -1


_PROBE = """
import torch
from qwen35.engine import runtime
runtime.ONEDNN_CACHE_CAPACITY = 1
print("settings", runtime.configure_cpu_runtime()["onednn_primitive_cache"], flush=True)
w = torch.randn(256, 512).bfloat16()
for m in (37, 53, 37):  # a row count, another, the first again
    torch.nn.functional.linear(torch.randn(m, 512).bfloat16(), w)
"""


@pytest.mark.parametrize("user", [None, "1024"])
def test_onednn_cache_capacity_takes_effect_after_torch_is_imported(user):
    """In a fresh process that imported torch first (as the engine's does): with capacity 1 the
    third matmul's kernel, its shape that of the first, is compiled again; with the user's 1024
    for oneDNN's cache (left as set) it comes from that cache. oneDNN's verbose mode says which;
    a third matmul that creates nothing came from ideep's cache, whose capacity 1 did not apply."""
    env = {**os.environ, "ONEDNN_VERBOSE": "profile_create"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    env.pop("LRU_CACHE_CAPACITY", None)
    if user is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=env, check=True).stdout  # fmt: skip
    assert f"settings {user or 1}" in out
    events = [w.split(",")[0] for w in out.split("create:")[1:]]
    if not events:
        pytest.skip("this CPU's bf16 matmuls do not run on oneDNN")
    assert len(events) == 3 and events[2] == ("cache_miss" if user is None else "cache_hit"), events
