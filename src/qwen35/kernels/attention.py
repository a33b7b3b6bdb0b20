"""Paged decode attention on the CPU (`attention_cpu.cpp`): one query token per sequence read
against its cached K/V in place, through its block table, the output gate applied.

    paged_decode_attention(q [N, nh, hd], key_cache, value_cache [blocks, bs, nkv, hd],
                           block_tables [N, W] int32, context_lens [N] int32, scale,
                           gate [N, nh, hd] or None, avx2_only=False) -> [N, nh, hd]
    fast_path(dtype, head_dim, avx2_only=False, kv_dtype=None) -> the AVX512 paths run

The caches hold the model dtype, bf16 / fp16 under an fp32 model, or fp8 (e4m3) under any model
(`--kv-cache-dtype`; `takes`).

Its PyTorch twin is ops/attention.py's `decode_attention` (gather the blocks, SDPA), which it
replaces on CPU backends with kernels (tests/test_attention_cpu.py; bench/attention_cpu.py).
"""

from __future__ import annotations

import torch

from qwen35.kernels import Native

ATTENTION = Native("attention_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"), needs=("avx2", "fma", "f16c"))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load():
    """The compiled module or None (no compiler, QWEN35_NO_KERNELS=1, a CPU without AVX2)."""
    return ATTENTION.load()


def takes(dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """The kernel runs a model of `dtype` over caches of `kv_dtype`."""
    if dtype not in DTYPES:
        return False
    if kv_dtype in (dtype, torch.float8_e4m3fn):
        return True
    return dtype == torch.float32 and kv_dtype in DTYPES
