"""Prefill tokens/s of one fresh sequence straight through the model, fast backend vs the plain
PyTorch reference backend, interleaved (GPU; also runs on a CPU at small sizes).

    python bench/gpu_prefill.py --model Qwen3.5-9B --device cuda --tokens 4096 32768

Random weights (catalog name). One ForwardBatch of T tokens from position 0 (no chunking, so
it measures the kernels: fla's chunked gated delta rule vs ours, SDPA attention, the GEMMs), the
median of --reps runs after a warm-up. Prints a table; --out writes JSON. --profile: one more fast
run per size under torch.profiler, its kernels by device time (the first H200 run: 9B at 4K
reached 23.7K tok/s, ~42% of what its FLOPs allow at the measured matrix rate; this says where
the rest goes).

    python bench/gpu_prefill.py --model Qwen3.5-9B --engine --tokens 8192 32768

--engine: what a user's prompt gets instead, through the engine: a T-token prompt's time to
its first token (one request, max_tokens 1, prefilled --max-num-batched-tokens a step, every
chunk after the first attending over the cached ones), with each way a chunk after a cached
prefix can attend (the paged Triton kernel, the gathered context through SDPA), the engine's
backend switched between them, prompts alternating; the engine's own start-up choice printed.
`--checkpoint-interval N` adds the chosen path with the prefix cache's DeltaNet state
checkpoints N tokens apart instead of the default ~256 (0: none inside the prompt): on a GPU
fla's chunked kernel hands out final states only, so every checkpoint splits its call
(ops/deltanet.py `_prefill_fla`), 8 calls a layer for a 2,048-token step at 256; what those
splits cost is this row against the chosen path's.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from qwen35.benchmarks.common import BenchOptions, load_bench_model, sync
from qwen35.engine.forward_batch import ForwardBatch, allocate_caches
from qwen35.ops.backend import reference_backend, select_backend


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="kernels by device time (CUDA)")
    ap.add_argument("--engine", action="store_true", help="through the engine, chunk paths A/B")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--checkpoint-interval", type=int, default=None,
                    help="--engine: also the chosen path with DeltaNet state checkpoints this many "
                         "tokens apart (0: none inside a prompt)")  # fmt: skip
    args = ap.parse_args(argv)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype, device=args.device))
    if args.engine:
        return engine_prefill(bm, args)
    model, dev = bm.model, bm.device
    backends = {"fast": select_backend(dev, dtype=bm.dtype), "reference": reference_backend(dev)}
    rows = []
    for T in args.tokens:
        nb = -(-T // 16)
        caches = allocate_caches(bm.config, nb, 16, 1, bm.dtype, dev)
        ids = torch.randint(0, bm.config.vocab_size, (T,), device=dev)
        times = {k: [] for k in backends}
        for rep in range(args.reps + 1):
            for name, be in backends.items():
                batch = prefill_batch(T, nb, dev, be)
                sync(dev)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(ids, batch, caches)
                sync(dev)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"tokens": T, **{f"{k}_tok_s": T / v for k, v in med.items()},
                     "speedup": med["reference"] / med["fast"]})  # fmt: skip
        if args.profile and dev.type == "cuda":
            batch = prefill_batch(T, nb, dev, backends["fast"])
            rows[-1]["fast_top_kernels"] = profile_kernels(functools.partial(model, ids, batch, caches))
        del caches
    print(f"prefill, {args.model} ({bm.dtype}, {dev}), fast = {backends['fast'].name}")
    print(f"{'tokens':>7} {'fast tok/s':>11} {'reference tok/s':>16} {'speedup':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['fast_tok_s']:>11.0f} {r['reference_tok_s']:>16.0f} "
              f"{r['speedup']:>7.2f}x")  # fmt: skip
    for r in rows:
        for k in r.get("fast_top_kernels", []):
            print(f"  {r['tokens']:>6} tokens: {k['ms']:8.2f} ms  x{k['count']:<4} {k['name'][:80]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "backend": backends["fast"].name, "rows": rows}, f,
                      indent=2)  # fmt: skip


def engine_prefill(bm, args) -> None:
    """--engine: time to first token of one T-token prompt per chunk path (module docstring)."""
    import dataclasses

    from qwen35.benchmarks.common import make_engine
    from qwen35.request import SamplingParams

    T_max = max(args.tokens)
    engine = make_engine(bm, max_model_len=T_max + 16,
                         max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    runner = engine.runner
    chosen = runner.backend
    # without our Triton attention every chunk gathers its context for the PyTorch path
    said = chosen.chunk_attention if chosen.triton_attention else "reference"
    sched = engine.scheduler
    default = sched.config
    # label -> (chunk attention path, scheduler config)
    variants = {p: (p, default) for p in
                (("triton", "sdpa") if chosen.triton_attention else ("reference",))}  # fmt: skip
    if args.checkpoint_interval is not None:  # the start-up's path, checkpoints further apart
        iv, bs = args.checkpoint_interval, default.block_size
        none = iv == 0  # no checkpoint inside a prompt at all
        config = dataclasses.replace(
            default, checkpoint_interval=-(-(T_max + 1) // bs) * bs if none else iv,
            checkpoint_prompt_end=default.checkpoint_prompt_end and not none)  # fmt: skip
        variants[f"{said}-ckpt{iv}"] = (said, config)
    paths = list(variants)
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows, n = [], 0
    for T in args.tokens:
        times = {p: [] for p in paths}
        for rep in range(args.reps + 1):
            for p in paths if rep % 2 else paths[::-1]:
                attention, sched.config = variants[p]
                if attention != "reference":
                    runner.backend = dataclasses.replace(chosen, chunk_attention=attention)
                ids = torch.randint(0, bm.model.config.vocab_size, (T,), generator=g).tolist()
                n += 1
                sync(bm.device)
                t0 = time.perf_counter()
                engine.add_request(f"p{n}", ids, sp)  # a fresh prompt: no prefix-cache hit
                while engine.has_unfinished_requests():
                    engine.step()
                if rep:
                    times[p].append(time.perf_counter() - t0)
        rows.append({"tokens": T, **{f"{p}_tok_s": T / statistics.median(v)
                                     for p, v in times.items()}})  # fmt: skip
    runner.backend, sched.config = chosen, default
    print(f"prompt prefill through the engine, {args.model} ({bm.dtype}, {bm.device}), "
          f"{args.max_num_batched_tokens} tokens a step, state checkpoints every "
          f"{default.checkpoint_interval} tokens; start-up chose {said!r} ({chosen.name})")  # fmt: skip
    for r in rows:
        print(f"{r['tokens']:>7} tokens: " + "  ".join(
            f"{p} {r[f'{p}_tok_s']:.0f} tok/s" for p in paths))  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "backend": chosen.name, "engine": True,
                       "chosen": said,
                       "max_num_batched_tokens": args.max_num_batched_tokens, "rows": rows},
                      f, indent=2)  # fmt: skip


def prefill_batch(T: int, nb: int, dev, be) -> ForwardBatch:
    """One fresh sequence of T tokens from position 0 in blocks 0..nb-1 of size 16."""
    return ForwardBatch.build(
        positions=range(T), cu_seqlens=[0, T], context_lens=[T], slot_mapping=range(T),
        block_tables=[list(range(nb))], state_slots=[0], has_initial_state=[False],
        logits_indices=[T - 1], device=dev, backend=be,
    )  # fmt: skip


def profile_kernels(run, top: int = 12) -> list[dict]:
    """One call of run() under torch.profiler: its CUDA kernels by summed device time."""
    from torch.profiler import ProfilerActivity, profile

    from qwen35.benchmarks.gpu_profile import kernels_by_time

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [{"name": n, "count": c, "ms": us / 1e3} for n, (c, us) in kernels_by_time(cuda, top)]


if __name__ == "__main__":
    main()
