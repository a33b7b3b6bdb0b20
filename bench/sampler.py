"""Micro-benchmark of the batched sampler against per-row baselines.

    python bench/sampler.py [--device cpu|cuda] [--rows 1 8 32] [--vocab 248320] [--reps 5]
                            [--threads N]

For each batch size and workload it times (median of --reps calls, after one warm-up):
- batched:  one `Sampler()(logits, rows)` call;
- per-row:  the same Sampler called once per row (vectorised over the vocab, not over rows);
- naive:    `reference_sample` per row (Python loops over the token history).
Workloads: greedy; full = temperature 0.8, top-k 50, top-p 0.9, min-p 0.02, repetition 1.1,
presence 0.5, frequency 0.3, seeded, logprobs 5, with a 1000-token prompt and 200 output tokens;
top-p = the same without top-k, which needs a full sort of the vocabulary.
Prints a table and writes bench/results/sampler.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from qwen35.engine.runtime import configure_cpu_runtime
from qwen35.engine.sampler import Sampler, SamplingRow, make_generator, reference_sample
from qwen35.request import SamplingParams

PROMPT_LEN, OUTPUT_LEN = 1000, 200


def make_rows(kind: str, n: int, vocab: int, device: str) -> list[SamplingRow]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        if kind == "greedy":
            rows.append(SamplingRow(SamplingParams(temperature=0.0)))
            continue
        p = SamplingParams(
            temperature=0.8, top_k=50 if kind == "full" else 0, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
            presence_penalty=0.5, frequency_penalty=0.3, seed=i, logprobs=5,
        )  # fmt: skip
        prompt = [rng.randrange(vocab) for _ in range(PROMPT_LEN)]
        output = [rng.randrange(vocab) for _ in range(OUTPUT_LEN)]
        rows.append(SamplingRow(p, prompt, output, make_generator(i, device), (0,)))
    return rows


def timed(fn, reps: int, device: str) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(sampler: Sampler, kind: str, n: int, args: argparse.Namespace) -> dict:
    x = torch.randn(n, args.vocab, generator=torch.Generator().manual_seed(n)) * 4
    x = x.to(args.device)  # [n, V]
    rows = make_rows(kind, n, args.vocab, args.device)
    ref_gen = torch.Generator(device=args.device).manual_seed(0)
    batched = timed(lambda: sampler(x, rows), args.reps, args.device)
    per_row = timed(
        lambda: [sampler(x[i : i + 1], [r]) for i, r in enumerate(rows)], args.reps, args.device
    )
    naive = timed(
        lambda: [reference_sample(x[i], r, ref_gen) for i, r in enumerate(rows)],
        args.reps,
        args.device,
    )
    return dict(
        workload=kind, rows=n, vocab=args.vocab, batched_ms=batched, per_row_ms=per_row,
        naive_ms=naive, per_row_over_batched=per_row / batched, naive_over_batched=naive / batched,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/sampler.json")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    # the engine's CPU settings; on a shared, oversubscribed CPU 1 thread gives steadier numbers
    configure_cpu_runtime(args.threads or None)

    sampler, results = Sampler(seed=0), []
    header = f"{'workload':<8} {'rows':>4} {'batched ms':>11} {'per-row ms':>11} {'naive ms':>10}"
    print(header + f" {'per-row/batched':>16} {'naive/batched':>14}")
    for kind in ("greedy", "full", "top-p"):
        for n in args.rows:
            rec = measure(sampler, kind, n, args)
            results.append(rec)
            print(
                f"{kind:<8} {n:>4} {rec['batched_ms']:>11.2f} {rec['per_row_ms']:>11.2f}"
                f" {rec['naive_ms']:>10.2f} {rec['per_row_over_batched']:>16.2f}"
                f" {rec['naive_over_batched']:>14.2f}"
            )
    meta = dict(
        device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(), reps=args.reps,
        prompt_len=PROMPT_LEN, output_len=OUTPUT_LEN,
    )  # fmt: skip
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
