"""heap.py: zeros_on_touch (the CPU caches' memory) and proc_bytes."""

from __future__ import annotations

import sys

import pytest
import torch

from qwen35.catalog import load_model_config
from qwen35.engine.forward_batch import allocate_caches
from qwen35.heap import LAZY_ZEROS_MIN, proc_bytes, zeros_on_touch


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny import save_checkpoint

    d = tmp_path_factory.mktemp("m")
    save_checkpoint(d)
    return d


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def rss_anon() -> int:
    return proc_bytes("/proc/self/status", "RssAnon")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_zeros_on_touch_is_a_tensor_of_zeros(dtype):
    for shape in ((3, 5), (64, 16, 2, 128)):  # below and above LAZY_ZEROS_MIN
        t = zeros_on_touch(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert not t.float().any()
        t[1, 2] = 1.5  # writable
        assert t.float().sum().item() == 1.5 * (t[1, 2].numel())
    big = zeros_on_touch((LAZY_ZEROS_MIN,), torch.uint8)
    assert big.data_ptr() % 4096 == 0  # page-aligned mapping


@linux
def test_zeros_on_touch_is_resident_only_where_touched():
    n = 256 << 20
    before = rss_anon()
    t = zeros_on_touch((n // 4,), torch.float32)
    assert rss_anon() - before < 16 << 20  # nothing written up front
    t[: n // 8].fill_(2.0)  # half of it
    grown = rss_anon() - before
    assert n // 2 - (16 << 20) < grown < n // 2 + (16 << 20)
    del t
    assert rss_anon() - before < 16 << 20  # the mapping goes with the tensor


@linux
def test_cpu_caches_cost_nothing_until_used():
    cfg = load_model_config("Qwen3.5-0.8B")
    before = rss_anon()
    caches = allocate_caches(cfg, 256, 16, 4, torch.bfloat16, "cpu")  # ~290 MiB
    size = sum(t.numel() * t.element_size() for t in (*caches.key, *caches.value,
                                                      *caches.conv, *caches.recurrent))  # fmt: skip
    assert size > 64 << 20 and rss_anon() - before < size // 8
    assert not any(t.any() for t in (*caches.key, *caches.recurrent))  # zeros


def test_caches_larger_than_the_memory_available_are_said_at_start(ckpt, monkeypatch, caplog):
    import qwen35.heap as heap
    from qwen35.engine.llm_engine import LLM

    monkeypatch.setattr(heap, "available_memory", lambda: 64 << 20)
    with caplog.at_level("WARNING", logger="qwen35"):
        llm = LLM(str(ckpt), dtype="fp32", verbose=False, max_memory="1GiB")
    msg = [r.getMessage() for r in caplog.records if "the caches take" in r.getMessage()]
    assert len(msg) == 1 and "64.0 MiB of memory is available" in msg[0], msg
    assert "--max-memory" in msg[0]
    caplog.clear()
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="qwen35"):
        llm = LLM(str(ckpt), dtype="fp32", verbose=False, max_memory="1GiB")
    assert not [r for r in caplog.records if "the caches take" in r.getMessage()]
    assert llm.generate([[1, 2, 3]])[0].outputs[0].token_ids  # (it serves)
