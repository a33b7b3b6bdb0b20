"""Accuracy of the quantized formats against BF16 on the same weights.

One sequence of `positions` tokens (the BF16 model's own greedy continuation of a short random
prompt, so the positions are what decoding would visit) is run through the BF16 model and
through each format (fp8, int8, int4, quantized at load from the same weights). Per format:
top-1 agreement (the share of positions where the next-token argmax is the same) and the mean
KL(BF16 || format) of the next-token distributions, twice: through one uncached pass (the
prefill paths: dequantise + GEMM, or int4's integer kernel on CPUs without AVX512) and through
the cache in chunks of 16 tokens (every linear
gets at most 16 rows: the decode kernels, whose rows come out as in a one-token step). "int4-x16"
is int4 with its activations kept at bf16 / 16 bits instead of rounded to 8 bits per 32 inputs
(`--int4-activations 16bit`, Int4Linear.x8 off): what that rounding costs. "kv-fp8" is the BF16
model itself on fp8 K/V caches (`--kv-cache-dtype fp8`). Logits are compared in chunks of rows so
[positions, vocab] never lives in memory twice. With random weights (the default model) the
distributions are nearly flat and the numbers only rank the formats; pass a checkpoint directory
as --model for meaningful ones. Compute is in bf16 where the device has it natively, else (a CPU
without AVX512-BF16 / AMX, whose bf16 GEMMs torch emulates: a run took 45+ min on a Zen 3) in fp32
on the same BF16-stored weights (`--dtype auto`'s choice): the BF16 model's weights either way.
"""

from __future__ import annotations

import dataclasses

import torch

from qwen35.benchmarks.common import BenchModel, BenchOptions, free_memory, load_bench_model
from qwen35.devices import default_dtype
from qwen35.loader import parse_dtype

FORMATS = ("fp8", "int8", "int4", "int4-x16")
CHUNK = 128
DECODE_ROWS = 16  # tokens a cached chunk: the decode kernels' row limit (kernels/gemv.py MAX_ROWS)


def sizes(opts: BenchOptions) -> dict:
    return {
        "positions": 64 if opts.quick else 1000,
        "prompt": 8,
        "greedy": 16 if opts.quick else 64,
    }


@torch.no_grad()
def _hidden(model, ids: torch.Tensor, kv_dtype=None) -> torch.Tensor:
    """ids [T] -> last hidden states [T, H] (one uncached pass; kv_dtype: the K/V caches',
    default the model's: a prompt attends to its K/V as they hold them)."""
    from qwen35.engine.forward_batch import allocate_caches
    from qwen35.models.qwen3_5 import uncached_batch

    T = ids.shape[0]
    caches = allocate_caches(model.config, 1, T, 1, model.dtype, ids.device, kv_dtype=kv_dtype)
    return model.forward_hidden(ids, uncached_batch(1, T, ids.device), caches)


@torch.no_grad()
def _hidden_decode(model, ids: torch.Tensor, rows: int = DECODE_ROWS, kv_dtype=None) -> torch.Tensor:
    """ids [T] -> last hidden states [T, H] through the cache, `rows` tokens a pass."""
    from qwen35.engine.forward_batch import ForwardBatch, allocate_caches

    T = ids.shape[0]
    caches = allocate_caches(model.config, 1, T, 1, model.dtype, ids.device, kv_dtype=kv_dtype)
    out = []
    for s in range(0, T, rows):
        n = min(rows, T - s)
        batch = ForwardBatch.build(
            positions=range(s, s + n),
            cu_seqlens=[0, n],
            context_lens=[s + n],
            slot_mapping=range(s, s + n),
            block_tables=[[0]],
            state_slots=[0],
            has_initial_state=[s > 0],
            logits_indices=range(n),
            device=ids.device,
        )
        out.append(model.forward_hidden(ids[s : s + n], batch, caches))
    return torch.cat(out)


def _compare(base, ref_h: torch.Tensor, q, h: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(base || q)) of the next-token distributions."""
    agree, kl = 0, 0.0
    for i in range(0, h.shape[0], CHUNK):
        lp_ref = torch.log_softmax(base.compute_logits(ref_h[i : i + CHUNK]), -1)
        lp = torch.log_softmax(q.compute_logits(h[i : i + CHUNK]), -1)
        agree += (lp_ref.argmax(-1) == lp.argmax(-1)).sum().item()
        kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
    return agree / h.shape[0], kl / h.shape[0]


@torch.no_grad()
def _sequence(bm: BenchModel, sz: dict, seed: int) -> torch.Tensor:
    """A short random prompt + the BF16 model's greedy continuation, padded with random tokens."""
    g = torch.Generator().manual_seed(seed)
    V = bm.config.vocab_size
    ids = torch.randint(0, V, (sz["prompt"],), generator=g)
    for _ in range(sz["greedy"]):
        h = _hidden(bm.model, ids)[-1:]
        ids = torch.cat([ids, bm.model.compute_logits(h).argmax(-1)])
    rest = torch.randint(0, V, (sz["positions"] + 1 - ids.shape[0],), generator=g)
    return torch.cat([ids, rest])[: sz["positions"] + 1]


def run_quality(bm: BenchModel, opts: BenchOptions) -> dict:
    sz = sizes(opts)
    cd = default_dtype(str(bm.device))  # --dtype auto's: fp32 on CPUs without native bf16
    at = dataclasses.replace(opts, dtype=cd)
    stored = "bf16" if cd == "fp32" else None  # the BF16 model's weights under fp32 compute
    same = str(bm.dtype) == str(parse_dtype(cd)) and bm.quantization == stored
    base = bm if same else load_bench_model(at, quantization=stored)
    ids = _sequence(base, sz, opts.seed).to(base.device)
    from qwen35.quant.layers import Int4Linear

    ref_h = _hidden(base.model, ids[:-1])  # [P, H]
    ref_d = _hidden_decode(base.model, ids[:-1])
    rows = {}
    for fmt in FORMATS:
        opts.say(f"quality: {fmt}")
        quant = fmt.split("-")[0]  # (int4-x16: int4)
        q = load_bench_model(at, quantization=quant)
        x8 = Int4Linear.x8
        Int4Linear.x8 = fmt != "int4-x16"
        try:
            h, hd = _hidden(q.model, ids[:-1]), _hidden_decode(q.model, ids[:-1])
        finally:
            Int4Linear.x8 = x8
        agree, kl = _compare(base.model, ref_h, q.model, h)
        d_agree, d_kl = _compare(base.model, ref_d, q.model, hd)
        rows[fmt] = {
            "weight_bytes": q.weight_bytes,
            "top1_agreement": agree,
            "mean_kl": kl,
            "decode_top1_agreement": d_agree,
            "decode_mean_kl": d_kl,
        }
        del q, h, hd
        free_memory()
    # the BF16 model's own weights on fp8 K/V caches (--kv-cache-dtype fp8): what the cache costs
    opts.say("quality: kv-fp8")
    fp8 = torch.float8_e4m3fn
    h = _hidden(base.model, ids[:-1], kv_dtype=fp8)
    hd = _hidden_decode(base.model, ids[:-1], kv_dtype=fp8)
    agree, kl = _compare(base.model, ref_h, base.model, h)
    d_agree, d_kl = _compare(base.model, ref_d, base.model, hd)
    rows["kv-fp8"] = {"weight_bytes": base.weight_bytes, "top1_agreement": agree, "mean_kl": kl,
                      "decode_top1_agreement": d_agree, "decode_mean_kl": d_kl}  # fmt: skip
    return {
        "positions": sz["positions"],
        "random_weights": bm.random_weights,
        "compute_dtype": cd,
        "bf16_weight_bytes": base.weight_bytes,
        "formats": rows,
    }
