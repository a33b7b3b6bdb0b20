"""fp32 vs bf16 weights (and fp32 compute on bf16-stored or int8 weights) for our engine on
this machine: prefill tokens/s and batch-1 decode.

On a CPU the choice is a real trade-off (devices.py): bf16 halves the bytes a decode step
reads, but without native bf16 arithmetic its matmuls are several times slower than fp32; with
AMX-BF16 (Sapphire Rapids and later) bf16 matmuls are instead several times faster. This
workload measures both in one run, interleaved round by round, on the same seeded weights
(the second dtype is loaded with the same seed), and says which is faster for what.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from qwen35.benchmarks.common import (
    BenchModel,
    BenchOptions,
    make_engine,
    median,
    ratio,
    timed_request,
)
from qwen35.devices import AVX2_HIDES, avx2_forced

# (name, compute dtype, weight-only quantization): fp32 and bf16 as they are, fp32 compute on
# bf16-stored weights (`--quantization bf16`: the same values as a BF16 checkpoint's, half
# fp32's decode bytes, widened per prefill chunk), and fp32 compute with int8 weights (a
# quarter of the bytes; changes the weights). The last two are for CPUs without native bf16,
# README "Dtype".
ENGINES = (
    ("float32", "fp32", None),
    ("bfloat16", "bf16", None),
    ("float32+bf16", "fp32", "bf16"),
    ("float32+int8", "fp32", "int8"),
)


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"prompt_len": 32, "new_tokens": 6, "rounds": opts.rounds or 1}
    return {"prompt_len": 512, "new_tokens": 32, "rounds": opts.rounds or 3}


def cpu_bf16_support() -> dict:
    """What torch reports about native bf16 on this CPU (empty where it cannot tell)."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None:
        return {}
    try:
        c = caps()
    except Exception:  # noqa: BLE001 - a capability probe must never fail the benchmark
        return {}
    out = {k: bool(c.get(k)) for k in ("amx_bf16", "avx512_bf16", "avx512_f", "avx2")}
    if avx2_forced():  # our kernels and devices.py see AVX2 only
        out = {k: v and not k.startswith(AVX2_HIDES) for k, v in out.items()}
    return out


def _one(engine, prompt: list[int], new_tokens: int, rid: str) -> tuple[float, list[float]]:
    """(prefill seconds, decode step seconds) of one greedy request."""
    prefill, steps, _ = timed_request(engine, prompt, new_tokens, rid)
    return prefill, steps


def run_dtype(bm: BenchModel, opts: BenchOptions) -> dict:
    from qwen35.benchmarks.common import load_bench_model

    sz = sizes(opts)
    P, N = sz["prompt_len"], sz["new_tokens"]
    models = {bm.label: bm}
    for name, dtype, quant in ENGINES:
        if name not in models:
            models[name] = load_bench_model(dataclasses.replace(opts, dtype=dtype), quant)
    models = {name: models[name] for name, _, _ in ENGINES}  # table order
    engines = {
        name: make_engine(m, max_num_seqs=1, max_model_len=P + N + 16, enable_prefix_caching=False)
        for name, m in models.items()
    }
    rng = random.Random(opts.seed)
    vocab = bm.config.vocab_size
    for name, eng in engines.items():  # warm-up: first calls pay one-off costs
        _one(eng, [rng.randrange(vocab) for _ in range(8)], 2, f"warm-{name}")
    prefill = {n: [] for n in engines}
    decode = {n: [] for n in engines}
    for r in range(sz["rounds"]):
        prompt = [rng.randrange(vocab) for _ in range(P)]
        for name, eng in engines.items():
            p, d = _one(eng, prompt, N, f"{name}-{r}")
            prefill[name].append(p)
            decode[name] += d
    rows = {}
    for name in engines:
        pre, dec = median(prefill[name]), median(decode[name])
        rows[name] = {
            "weight_bytes": models[name].weight_bytes,
            "prefill_s": pre,
            "prefill_tokens_per_s": P / pre,
            "decode_ms_per_token": dec * 1e3,
            "decode_tokens_per_s": 1 / dec,
        }
    f32 = rows["float32"]

    def over_fp32(name: str) -> dict:
        return {k: ratio(rows[name][f"{k}_tokens_per_s"], f32[f"{k}_tokens_per_s"])
                for k in ("prefill", "decode")}  # fmt: skip

    del engines, models
    return {
        "prompt_len": P,
        "new_tokens": N,
        "rounds": sz["rounds"],
        "cpu_bf16": cpu_bf16_support() if bm.device.type == "cpu" else {},
        "dtypes": rows,
        "bf16_over_fp32": over_fp32("bfloat16"),
        "bf16_storage_over_fp32": over_fp32("float32+bf16"),
        "int8_over_fp32": over_fp32("float32+int8"),
        "faster": {
            k: max(rows, key=lambda n, k=k: rows[n][f"{k}_tokens_per_s"])
            for k in ("prefill", "decode")
        },
    }
