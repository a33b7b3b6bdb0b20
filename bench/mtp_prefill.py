"""What the MTP head costs a prompt: prefill tokens/s without drafts, with drafts (the MTP pass
over a chunk runs its whole layer at the draft rows only: model_runner._draft, MTP_ROWS_ONLY),
and with drafts and the whole layer over every row (as before 2026-12-07), interleaved.

    python bench/mtp_prefill.py [--model Qwen3.5-0.8B] [--prompt 2048] [--rounds 3] [--dtype bf16]

Random weights with the MTP head, one engine per kind over the same weights, each prompt
generated with max_tokens=1 (its prefill and one sampled token; the MTP pass drafts from the
last row), prefix caching off.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.engine import model_runner
    from qwen35.engine.runtime import configure_cpu_runtime
    from qwen35.request import SamplingParams

    configure_cpu_runtime(args.threads)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype), mtp=True)
    kw = dict(max_model_len=args.prompt + 16, max_num_batched_tokens=args.prompt,
              enable_prefix_caching=False)  # fmt: skip
    plain = make_engine(bm, **kw)
    spec = make_engine(bm, num_speculative_tokens=1, **kw)
    rng = random.Random(0)
    V = bm.config.vocab_size
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    kinds = {"no drafts": (plain, 8), "drafts, layer at draft rows": (spec, 8),
             "drafts, layer over every row": (spec, 1 << 30)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds + 1):  # round 0: warm-up
        prompt = [rng.randrange(V) for _ in range(args.prompt)]
        order = list(kinds)[r % 3 :] + list(kinds)[: r % 3]
        for name in order:
            eng, rows_only = kinds[name]
            model_runner.MTP_ROWS_ONLY = rows_only
            eng.add_request(f"{name}-{r}", prompt, sp)
            t0 = time.perf_counter()
            while eng.has_unfinished_requests():
                eng.step()
            if r:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["no drafts"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:30s} {args.prompt / med:8.1f} tok/s  ({base / med:.3f}x no drafts; "
              f"rounds {', '.join(f'{args.prompt / t:.1f}' for t in ts)})")  # fmt: skip


if __name__ == "__main__":
    main()
