"""Decode step time at long contexts: the hybrid model vs the same model with every layer full
attention (the article's cheap long-context decoding, as a measured ratio), and the hybrid model
on fp8 K/V caches (--kv-cache-dtype fp8: half a bf16 cache's bytes per token).

A decode step's cost depends on sizes, not values, so no 32K-token prefill is run: the paged
KV cache (context_len tokens) and the DeltaNet states are filled with random values and one
decode `ForwardBatch` at position context_len - 1 is timed straight through the model (embedding
to logits; median of a few steps after a warm-up). The all-full-attention variant is the same
config with `layer_types` all "full_attention" (dataclasses.replace) and its own random weights.
Both models are loaded together and, at each context, their steps alternate (hybrid, full,
hybrid, ...), so a slow phase of a shared machine hits both alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from qwen35.benchmarks.common import BenchModel, BenchOptions, free_memory, median, ratio, timed
from qwen35.cache_spec import cache_spec
from qwen35.config import ModelConfig
from qwen35.engine.config import CacheConfig
from qwen35.engine.forward_batch import ForwardBatch, allocate_caches

DEFAULT_CONTEXTS = (1024, 8192, 32768)
QUICK_CONTEXTS = (64, 256)
BLOCK_SIZE = CacheConfig().block_size  # the engine's default
FP8 = torch.float8_e4m3fn


def all_full_attention(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name} (all full attention)",
        layer_types=("full_attention",) * cfg.num_hidden_layers,
    )


@torch.inference_mode()
def decode_step(
    model: torch.nn.Module,
    context_len: int,
    device: torch.device,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> Callable[[], None]:
    """A warmed-up decode step of one sequence whose cache holds context_len - 1 tokens
    (kv_dtype: the K/V caches', default the model's)."""
    cfg = model.config
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    nb = math.ceil(context_len / BLOCK_SIZE)
    caches = allocate_caches(cfg, nb, BLOCK_SIZE, 1, dtype, device, kv_dtype=kv_dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for t in (*caches.key, *caches.value, *caches.conv):
        # (normal_ takes no fp8: drawn in fp32, then stored)
        t.copy_(torch.empty(t.shape, device=device).normal_(0.0, 1.0, generator=g))
    for t in caches.recurrent:
        t.normal_(0.0, 0.05, generator=g)
    pos = context_len - 1
    batch = ForwardBatch.build(
        positions=torch.tensor([pos], device=device),
        cu_seqlens=[0, 1],
        context_lens=[context_len],
        slot_mapping=torch.tensor([pos], device=device),
        block_tables=torch.arange(nb, dtype=torch.int32, device=device)[None],
        state_slots=torch.tensor([0], device=device),
        has_initial_state=[True],
        logits_indices=torch.tensor([0], device=device),
    )
    ids = torch.tensor([1], device=device)

    @torch.inference_mode()
    def step() -> None:
        model(ids, batch, caches)

    step()  # warm-up
    return step


def interleaved_times(steps: dict[str, Callable[[], None]], reps: int, device) -> dict:
    """Seconds of each step over `reps` rounds, one call of each per round in turn."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return times


def run_long_context(bm: BenchModel, opts: BenchOptions) -> dict:
    from qwen35.loader import load_model

    contexts = tuple(opts.contexts or (QUICK_CONTEXTS if opts.quick else DEFAULT_CONTEXTS))
    reps = 2 if opts.quick else 5
    cfg = bm.config
    full_cfg = all_full_attention(cfg)
    dname = str(bm.dtype).removeprefix("torch.")
    rows = {c: {"context_len": c} for c in contexts}
    full = load_model(full_cfg, dtype=bm.dtype, device=bm.device, load_format="random")
    full_weight_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    for c in contexts:
        steps = {
            "hybrid_ms": decode_step(bm.model, c, bm.device),
            "full_attention_ms": decode_step(full, c, bm.device),
            "hybrid_fp8_kv_ms": decode_step(bm.model, c, bm.device, kv_dtype=FP8),
        }
        for key, ts in interleaved_times(steps, reps, bm.device).items():
            rows[c][key] = median(ts) * 1e3
        opts.say(
            f"  context {c}: hybrid {rows[c]['hybrid_ms']:.1f} ms, all full attention "
            f"{rows[c]['full_attention_ms']:.1f} ms, hybrid on fp8 K/V "
            f"{rows[c]['hybrid_fp8_kv_ms']:.1f} ms"
        )
        del steps
        free_memory()
    del full
    free_memory()
    for r in rows.values():
        r["full_over_hybrid"] = ratio(r["full_attention_ms"], r["hybrid_ms"])
        r["hybrid_over_fp8_kv"] = ratio(r["hybrid_ms"], r["hybrid_fp8_kv_ms"])
    kv_h = cache_spec(cfg, kv_dtype=dname, conv_dtype=dname)
    kv_f = cache_spec(full_cfg, kv_dtype=dname, conv_dtype=dname)
    first, last = rows[contexts[0]], rows[contexts[-1]]
    return {
        "block_size": BLOCK_SIZE,
        "reps": reps,
        "contexts": list(contexts),
        "weight_bytes": {"hybrid": bm.weight_bytes, "full": full_weight_bytes},
        "kv_bytes_per_token": {
            "hybrid": kv_h.kv_bytes_per_token,
            "full": kv_f.kv_bytes_per_token,
            "hybrid_fp8": cache_spec(cfg, kv_dtype="fp8", conv_dtype=dname).kv_bytes_per_token,
        },
        "state_bytes_per_sequence": {
            "hybrid": kv_h.state_bytes_per_sequence,
            "full": kv_f.state_bytes_per_sequence,
        },
        "rows": [rows[c] for c in contexts],
        # how much a step slows from the shortest to the longest context
        "growth": {
            "hybrid": ratio(last["hybrid_ms"], first["hybrid_ms"]),
            "full": ratio(last["full_attention_ms"], first["full_attention_ms"]),
        },
    }
