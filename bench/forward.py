"""Forward speed of our Qwen 3.5 model against transformers, same random weights, one run.

    python bench/forward.py [--model Qwen3.5-0.8B] [--dtype fp32|bf16] [--lengths 512 2048]
                            [--repeats 3] [--threads N] [--decode-steps 16] [--layers N]

Both models are built from the bundled config (text only: no vision, no MTP) with the same
random weights (ours initialised, copied into transformers' `Qwen3_5ForCausalLM` with
load_state_dict), in the same dtype and thread count. Timings are medians of --repeats calls
after one warm-up, interleaved (ours, transformers, ...) so machine load drifts hit both.
The process gets the engine's CPU runtime settings (`configure_cpu_runtime`: denormals flushed,
freed memory kept in the heap), so both models run as they would under an engine.

Prefill (prompt tokens/s), one sequence of each length:
- ours:        the engine path, `model(ids, ForwardBatch, caches)`, logits of the last token;
- hf last:     `hf(ids, logits_to_keep=1)`, the same work (what `generate` runs for a prompt);
- hf all:      `hf(ids)`, transformers' default call, logits for every prompt token.
Decode (batch 1, after a --decode-context prompt): ms per token, ours through paged caches,
transformers through its DynamicCache, plus the bandwidth roofline (the bytes a decode step moves,
`qwen35.benchmarks.roofline`, over the measured read bandwidth). Prints a table and writes bench/results/forward.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qwen35.benchmarks.roofline import decode_bytes_per_step, measure_read_bandwidth
from qwen35.catalog import load_model_config, load_raw
from qwen35.engine.forward_batch import allocate_caches
from qwen35.engine.runtime import configure_cpu_runtime
from qwen35.models.qwen3_5 import Qwen35ForCausalLM, uncached_batch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_models(name: str, dtype: torch.dtype, layers: int | None, seed: int = 0):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    cfg = load_model_config(name)
    text = load_raw(name)["text_config"]
    text["tie_word_embeddings"] = cfg.tie_word_embeddings
    if layers:
        cfg = dataclasses.replace(
            cfg, num_hidden_layers=layers, layer_types=cfg.layer_types[:layers]
        )
        text.update(num_hidden_layers=layers, layer_types=text["layer_types"][:layers])
    ours = Qwen35ForCausalLM(cfg, dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=g).log())  # HF's init
            elif n.endswith("dt_bias"):
                p.fill_(1.0)
            elif "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + ("linear_attn.norm" in n))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    config = Qwen3_5TextConfig(**text)
    config._attn_implementation = "sdpa"  # transformers' default
    with torch.device("meta"):
        hf = Qwen3_5ForCausalLM(config)
    hf = hf.to_empty(device="cpu").to(dtype).eval()
    hf.model.rotary_emb = Qwen3_5TextRotaryEmbedding(config)  # its buffer is lost on meta
    hf.load_state_dict(ours.state_dict())
    # Re-allocate both models' weights side by side: on this VM, weights written long before
    # (ours, built first) streamed up to 2x slower in decode than freshly copied ones (hf).
    with torch.no_grad():
        for m in (ours, hf):
            for p in m.parameters():
                p.data = p.data.clone()
    ours.tie_weights()
    return cfg, ours, hf


def median_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """One warm-up each, then `repeats` rounds calling every fn in turn; seconds per call."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def bench_prefill(cfg, ours, hf, length: int, repeats: int, dtype) -> dict:
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(1))
    batch = uncached_batch(1, length, "cpu")
    batch.logits_indices = torch.tensor([length - 1])
    caches = allocate_caches(cfg, 1, length, 1, dtype, "cpu")
    with torch.no_grad():
        t = median_times(
            {
                "ours": lambda: ours(ids, batch, caches),
                "hf_last": lambda: hf(ids[None], logits_to_keep=1),
                "hf_all": lambda: hf(ids[None]),
            },
            repeats,
        )
        ref = hf(ids[None], logits_to_keep=1).logits[0, -1].float()
        diff = ((ours(ids, batch, caches)[0] - ref).abs().max() / ref.abs().max()).item()
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "tokens": length,
        "last_logits_max_rel_diff": diff,  # same weights, same model: a sanity check
        "seconds": med,
        "raw_seconds": t,
        "tokens_per_s": {k: length / v for k, v in med.items()},
        "speedup_vs_hf_last": med["hf_last"] / med["ours"],
        "speedup_vs_hf_all": med["hf_all"] / med["ours"],
    }


def bench_decode(cfg, ours, hf, context: int, steps: int, dtype) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(0, cfg.vocab_size, (context + steps,))
    bs = 16
    nb = -(-(context + steps) // bs)
    caches = allocate_caches(cfg, nb, bs, 1, dtype, "cpu")
    table = torch.arange(nb, dtype=torch.int32)[None]
    ours_t, hf_t = [], []
    with torch.no_grad():
        b = uncached_batch(1, context, "cpu")
        b.block_tables, b.logits_indices = table, torch.tensor([context - 1])
        ours(ids[:context], b, caches)
        cache = DynamicCache(config=hf.config)
        hf(ids[None, :context], cache=cache, use_cache=True, logits_to_keep=1)
        for t in range(context, context + steps):
            b = dataclasses.replace(
                b,
                positions=torch.tensor([t]),
                cu_seqlens=[0, 1],
                context_lens=[t + 1],
                slot_mapping=torch.tensor([t]),
                has_initial_state=[True],
                logits_indices=torch.tensor([0]),
            )
            t0 = time.perf_counter()
            ours(ids[t : t + 1], b, caches)
            t1 = time.perf_counter()
            hf(ids[None, t : t + 1], cache=cache, use_cache=True)
            t2 = time.perf_counter()
            ours_t.append(t1 - t0)
            hf_t.append(t2 - t1)
    o, h = statistics.median(ours_t[1:]), statistics.median(hf_t[1:])
    return {"context": context, "steps": steps, "ms_per_token": {"ours": o * 1e3, "hf": h * 1e3},
            "speedup_vs_hf": h / o}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16, help="0 skips the decode bench")
    ap.add_argument("--layers", type=int, default=None, help="truncate the model (quick runs)")
    ap.add_argument("--out", default="bench/results/forward.json")
    args = ap.parse_args()
    # the engine's CPU settings (threads, denormal flush, heap), before any parallel op so
    # every worker thread inherits them; they apply to both models
    configure_cpu_runtime(args.threads)
    dtype = DTYPES[args.dtype]

    t0 = time.perf_counter()
    cfg, ours, hf = build_models(args.model, dtype, args.layers)
    print(
        f"built {args.model} ({args.dtype}, {args.threads} threads) in {time.perf_counter() - t0:.0f} s"
    )
    prefill = [bench_prefill(cfg, ours, hf, n, args.repeats, dtype) for n in args.lengths]
    print(f"\nprefill, one sequence, median of {args.repeats} (tokens/s)")
    print(f"{'tokens':>7} {'ours':>9} {'hf last':>9} {'hf all':>9} {'vs last':>8} {'vs all':>8}")
    for r in prefill:
        assert r["last_logits_max_rel_diff"] < 0.05, r  # both must compute the same model
        tps = r["tokens_per_s"]
        print(f"{r['tokens']:>7} {tps['ours']:>9.1f} {tps['hf_last']:>9.1f} {tps['hf_all']:>9.1f} "
              f"{r['speedup_vs_hf_last']:>7.2f}x {r['speedup_vs_hf_all']:>7.2f}x")  # fmt: skip

    decode = None
    if args.decode_steps:
        decode = bench_decode(cfg, ours, hf, args.decode_context, args.decode_steps, dtype)
        bw = measure_read_bandwidth() / 1e9
        step_bytes = decode_bytes_per_step(ours, args.decode_context)
        roof = bw * 1e9 / step_bytes["total"]
        decode.update(read_bandwidth_gbs=bw, bytes_per_step=step_bytes,
                      roofline_tokens_per_s=roof,
                      roofline_fraction=1e3 / decode["ms_per_token"]["ours"] / roof)  # fmt: skip
        ms = decode["ms_per_token"]
        print(
            f"\ndecode, batch 1, context {args.decode_context}, median of {args.decode_steps - 1}"
        )
        print(f"  ours {ms['ours']:.1f} ms/token, transformers {ms['hf']:.1f} ms/token "
              f"({decode['speedup_vs_hf']:.2f}x); roofline {roof:.1f} tokens/s at {bw:.1f} GB/s "
              f"-> ours at {decode['roofline_fraction']:.0%}")  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "layers": args.layers or cfg.num_hidden_layers,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "prefill": prefill,
        "decode": decode,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
