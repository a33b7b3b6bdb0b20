"""Paged decode attention on the CPU (`attention_cpu.cpp`): one query token per sequence read
against its cached K/V in place, through its block table, the output gate applied.

    paged_decode_attention(q [N, nh, hd], key_cache, value_cache [blocks, bs, nkv, hd],
                           block_tables [N, W] int32, context_lens [N] int32, scale,
                           gate [N, nh, hd] or None, avx2_only=False) -> [N, nh, hd]
    fast_path(dtype, head_dim, avx2_only=False, kv_dtype=None) -> the AVX512 paths run

and causal prefill attention for bf16 models on AVX512-BF16 CPUs and fp32 models on AVX2 ones
(`attention_prefill_cpu.cpp`):

    prefill_attention(q [Tq, nh, hd] bf16 / fp32, key_cache, value_cache [blocks, bs, nkv, hd]
                      (bf16: bf16 or fp8; fp32: fp32, bf16, fp16 or fp8), block_row [W] int32,
                      start, scale) -> [Tq, nh, hd]

the queries at positions start .. start + Tq - 1 over the context's K/V, read through the block
row (`load_prefill`, `prefill_takes`; its PyTorch twin: ops/attention.py prefill_attention, SDPA;
tests/test_attention_prefill.py, bench/attention_prefill.py).

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


PREFILL = Native("attention_prefill_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"),
                 needs=("avx2", "fma", "f16c"))  # fmt: skip


def load_prefill():
    """`attention_prefill_cpu.cpp`'s module, or None (no compiler, QWEN35_NO_KERNELS=1, a CPU
    without AVX2)."""
    return PREFILL.load()


PREFILL_CACHES = {
    torch.bfloat16: (torch.bfloat16, torch.float8_e4m3fn),
    torch.float32: (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn),
}


def prefill_takes(mod, q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """The prefill kernel `mod` runs these queries over this cache: a bf16 model (on AVX512-BF16
    CPUs) or an fp32 one, a cache dtype it reads, a head dim of a multiple of 32."""
    return (q.is_cpu and q.shape[-1] % 32 == 0
            and key_cache.dtype in PREFILL_CACHES.get(q.dtype, ())
            and (q.dtype != torch.bfloat16 or mod.bf16_supported()))  # fmt: skip
