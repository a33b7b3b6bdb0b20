"""Prefill attention on the CPU: our kernel (kernels/attention_prefill_cpu.cpp,
reading the paged cache) vs the PyTorch path it replaces (ops/attention.py: torch's SDPA, causal on
a first chunk's own K/V; the context gathered from the cache + a boolean mask for a chunk after a
cached prefix), interleaved in one process.

    python bench/attention_prefill.py [--chunk 2048] [--contexts 2048,8192,32768] [--heads 8,2]
                                      [--head-dim 256] [--dtype bf16|fp32] [--threads 2] [--rounds 3]

`--engine 2048,8192`: whole prompts of these lengths prefilled by a --dtype Qwen3.5-0.8B engine (random
weights, the prompt cut into --chunk-token steps) with the kernel and without it (the PyTorch path),
alternating round by round: prefill tokens/s.

One attention layer's call for a chunk of --chunk queries ending at each context length (the
Qwen3.5-0.8B / 2B attention shape by default: 8 query heads, 2 KV heads, head dim 256; blocks of
16 positions in a shuffled block table); ms per call, GFLOP/s of the causal work (4 Tq (ctx - Tq
/ 2) hd nh), and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwen35.kernels import attention
from qwen35.ops import attention as ops


def engine_prefill(lengths: list[int], chunk: int, rounds: int, dtype: str) -> None:
    from qwen35.benchmarks.common import BenchOptions, prefill_ab
    from qwen35.layers import full_attention

    real = ops.cpu_prefill_kernel

    def use(fn):
        ops.cpu_prefill_kernel = full_attention.cpu_prefill_kernel = fn

    modes = {"SDPA": lambda: use(lambda *a: None), "kernel": lambda: use(real)}
    prefill_ab(BenchOptions(dtype=dtype), lengths, chunk, rounds, modes, f"{dtype} engine")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--heads", default="8,2", help="query heads, KV heads")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", default="", help="whole-prompt lengths through the engine")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.engine:
        engine_prefill([int(n) for n in a.engine.split(",")], a.chunk, a.rounds, a.dtype)
        return
    mod = attention.load_prefill()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if mod is None or (dtype == torch.bfloat16 and not mod.bf16_supported()):
        raise SystemExit(f"the prefill kernel does not run {a.dtype} here (bf16: AVX512-BF16)")
    nh, nkv = (int(v) for v in a.heads.split(","))
    hd = a.head_dim
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; {a.dtype}; {nh} query heads, {nkv} KV heads, "
          f"head dim {hd}")  # fmt: skip
    for ctx in (int(c) for c in a.contexts.split(",")):
        one_layer(mod, ctx, min(a.chunk, ctx), nh, nkv, hd, a.rounds, g, dtype)


def one_layer(mod, ctx: int, tq: int, nh: int, nkv: int, hd: int, rounds: int, g,
              dtype: torch.dtype) -> None:  # fmt: skip
    start, bs, scale = ctx - tq, 16, hd**-0.5
    nb = -(-ctx // bs)
    row = torch.randperm(nb, generator=g).to(torch.int32)
    kc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)
    vc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)
    q = torch.randn(tq, nh, hd, generator=g).to(dtype)
    k, v = (ops.gather_kv(c, row, ctx) for c in (kc, vc))

    def sdpa():
        if start == 0:
            return ops.prefill_attention(q, k, v, scale)
        kk, vv = ops.gather_kv(kc, row, ctx), ops.gather_kv(vc, row, ctx)
        return ops.prefill_attention(q, kk, vv, scale)

    calls = {"sdpa": sdpa, "kernel": lambda: mod.prefill_attention(q, kc, vc, row, start, scale)}
    t: dict[str, list[float]] = {n: [] for n in calls}
    out = {n: f() for n, f in calls.items()}  # warm
    for r in range(rounds):
        for n in calls if r % 2 == 0 else list(calls)[::-1]:
            t0 = time.perf_counter()
            calls[n]()
            t[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in t.items()}
    flops = 4 * tq * (ctx - tq / 2) * hd * nh
    diff = (out["sdpa"].float() - out["kernel"].float()).abs().max().item()
    print(f"chunk {tq} at context {ctx}: SDPA {med['sdpa'] * 1e3:8.1f} ms "
          f"({flops / med['sdpa'] / 1e9:4.0f} GFLOP/s), kernel {med['kernel'] * 1e3:8.1f} ms "
          f"({flops / med['kernel'] / 1e9:4.0f}): {med['sdpa'] / med['kernel']:.2f}x; "
          f"max |diff| {diff:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
