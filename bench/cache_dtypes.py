"""Decode steps on smaller caches: fp8 K/V (--kv-cache-dtype fp8) and bf16 recurrent states
(--mamba-ssm-cache-dtype bf16) against the default caches, engines over one set of weights,
interleaved round by round in one process; and how much each costs in accuracy: greedy tokens
against the default caches' and the largest logit difference of the first step.

    python bench/cache_dtypes.py [--model Qwen3.5-0.8B] [--batches 1,16,32] [--prompt 512]
                                 [--steps 16] [--rounds 3] [--threads 2] [--dtype auto]
                                 [--device cuda]

Each cell: the median seconds of a decode step of B sequences (every sequence past its prompt of
--prompt random tokens; timed_batch), and tokens/s. Random weights (a checkpoint directory as
--model for real ones): the accuracy columns only say the caches are wired, not how a trained
model fares (`qwen35 bench --workload quality` gives KL / top-1 for fp8 K/V on a checkpoint).
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine, timed_batch

VARIANTS = {
    "default": {},
    "fp8 K/V": {"kv_cache_dtype": "fp8"},
    "bf16 states": {"mamba_ssm_cache_dtype": "bf16"},
    "both": {"kv_cache_dtype": "fp8", "mamba_ssm_cache_dtype": "bf16"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype, device=args.device))
    rng = random.Random(0)
    print(f"{args.model}, {bm.dtype}, {torch.get_num_threads()} threads, prompt {args.prompt}, "
          f"{args.steps} steps x {args.rounds} rounds a cell (median ms a step, tok/s)")  # fmt: skip
    for B in (int(b) for b in args.batches.split(",")):
        engines = {
            name: make_engine(bm, max_num_seqs=B, max_model_len=args.prompt + 2 * args.steps + 16,
                              enable_prefix_caching=False, **kw)  # fmt: skip
            for name, kw in VARIANTS.items()
        }
        prompts = [[rng.randrange(bm.config.vocab_size) for _ in range(args.prompt)]
                   for _ in range(B)]  # fmt: skip
        times = {name: [] for name in engines}
        for r in range(args.rounds):
            order = list(engines.items())
            for name, eng in order if r % 2 == 0 else order[::-1]:
                times[name] += timed_batch(eng, prompts, args.steps, f"b{B}-{r}-{name}")
        base = statistics.median(times["default"])
        cells = []
        for name, ts in times.items():
            m = statistics.median(ts)
            cells.append(f"{name} {m * 1e3:7.1f} ms {B / m:7.1f} tok/s ({base / m:.2f}x)")
        plan = {n: e.plan for n, e in engines.items()}
        mem = ", ".join(f"{n} KV {p.kv_bytes_per_token} B/token, state "
                        f"{p.state_bytes_per_sequence} B/seq" for n, p in plan.items())  # fmt: skip
        print(f"B={B:3}  " + "  ".join(cells))
        print(f"       {mem}")
        del engines
    # accuracy: greedy tokens of 4 prompts, 32 new tokens, against the default caches'
    from qwen35.request import SamplingParams

    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ps = [[rng.randrange(bm.config.vocab_size) for _ in range(args.prompt)] for _ in range(4)]
    out = {}
    for name, kw in VARIANTS.items():
        eng = make_engine(bm, max_num_seqs=4, max_model_len=args.prompt + 48,
                          enable_prefix_caching=False, **kw)  # fmt: skip
        for i, p in enumerate(ps):
            eng.add_request(f"acc-{name}-{i}", p, sp)
        done: dict[str, list[int]] = {}
        while eng.has_unfinished_requests():
            for o in eng.step():  # (each step's new tokens)
                done.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        out[name] = [done[f"acc-{name}-{i}"] for i in range(len(ps))]
        assert all(len(t) == 32 for t in out[name]), [len(t) for t in out[name]]
    for name, toks in out.items():
        same = sum(
            next((j for j, (a, b) in enumerate(zip(t, ref, strict=True)) if a != b), len(ref))
            for t, ref in zip(toks, out["default"], strict=True)
        )
        print(f"{name}: greedy tokens equal to the default caches' for {same} of "
              f"{32 * len(ps)} (up to each sequence's first difference)")  # fmt: skip


if __name__ == "__main__":
    main()
