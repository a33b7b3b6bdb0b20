"""Continuous-batching decode by weight storage: fp32, fp32 compute on bf16-stored weights
(`--quantization bf16`, what `--dtype auto` runs on CPUs without native bf16) and, optionally,
bf16, at several batch sizes, the engines alternating round by round in one process.

    python bench/dtype_batches.py [--model Qwen3.5-0.8B] [--batches 1 4 8 16] [--rounds 3]
                                  [--threads 2] [--new-tokens 17] [--engines fp32 fp32+bf16 bf16]

What an AVX2-only CPU (e.g. AMD Zen 3) runs, on any x86-64 machine:
    QWEN35_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/dtype_batches.py

Each round: for every batch size, the same 32-token random prompts to each engine, one prefill
step, then decode steps timed (the first two dropped); tokens/s = batch / median step; the best
round per engine and batch is printed (random weights; compare within one run only).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

ENGINES = {"fp32": ("fp32", None), "fp32+bf16": ("fp32", "bf16"), "bf16": ("bf16", None)}


def run(args) -> dict:
    from qwen35 import LLM
    from qwen35.request import SamplingParams

    torch.set_num_threads(args.threads)
    top = max(args.batches)
    engines = {
        name: LLM(f"random:{args.model}", dtype=ENGINES[name][0], quantization=ENGINES[name][1],
                  verbose=False, max_model_len=32 + args.new_tokens + 16,
                  max_num_seqs=top, max_num_batched_tokens=max(512, 32 * top)).engine
        for name in args.engines
    }  # fmt: skip
    rng = random.Random(0)
    vocab = next(iter(engines.values())).config.vocab_size
    out: dict = {n: {b: [] for b in args.batches} for n in engines}
    for r in range(args.rounds):
        for b in args.batches:
            prompts = [[rng.randrange(2, vocab) for _ in range(32)] for _ in range(b)]
            for name, eng in engines.items():
                sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
                for i, p in enumerate(prompts):
                    eng.add_request(f"{name}-{r}-{b}-{i}", p, sp)
                eng.step()  # every prompt in one prefill step
                steps = []
                while eng.has_unfinished_requests():
                    t = time.perf_counter()
                    eng.step()
                    steps.append(time.perf_counter() - t)
                steps = sorted(steps[2:] or steps)
                out[name][b].append(b / steps[len(steps) // 2])
    return {n: {b: max(v) for b, v in per.items()} for n, per in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen3.5-0.8B")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=17)
    p.add_argument("--engines", nargs="+", default=["fp32", "fp32+bf16"], choices=list(ENGINES))
    args = p.parse_args(argv)
    res = run(args)
    base = args.engines[0]
    for b in args.batches:
        cells = [f"{n} {res[n][b]:7.1f} tok/s" + (f" ({res[n][b] / res[base][b]:.2f}x)"
                 if n != base else "") for n in args.engines]  # fmt: skip
        print(f"batch {b:2d}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
