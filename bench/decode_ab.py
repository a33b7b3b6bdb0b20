"""Whole-engine batch-1 decode step, this checkout against a git revision, in alternating
processes (each process loads the model once and times one round), so kernel changes are
measured where they land: ms per decode step after a 128-token and after a 2,048-token prompt.

    python bench/decode_ab.py --baseline ef2cb38 --quantization int4 --rounds 4
    python bench/decode_ab.py --baseline ef2cb38 --model DIR/config.json   # e.g. the MoE peers model
    QWEN35_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/decode_ab.py --baseline ef2cb38 --quantization int4   # as on an AVX2-only CPU
    python bench/decode_ab.py --baseline ef2cb38 --model Qwen3.5-2B --quantization int4 --batch 16

The revision is checked out into a temporary git worktree and run from its own `src` (its
kernels build beside this checkout's, keyed by their source). Qwen3.5-0.8B config (or --model), random
weights, `--dtype auto` (or --dtype), greedy; medians of each round's steps, then per-round ratios.
`--batch B`: B sequences of 128-token prompts decoding together instead (benchmarks/common.py
timed_batch: ms per step of all B, 24 steps a round); no 2,048-token prompt.
"""

from __future__ import annotations

import argparse
import statistics

PROMPTS = ((128, 32), (2048, 12))  # (prompt tokens, decode steps timed)


BATCH_STEPS = 24  # --batch: steps timed a round


def one_round(quantization: str | None, threads: int, model: str, batch: int = 1,
              dtype: str = "auto") -> None:
    """Runs in the child: prints the median ms per step after each prompt length (batch > 1:
    of `batch` sequences decoding together, after 128-token prompts)."""
    import torch

    from qwen35.benchmarks.common import (
        BenchOptions,
        load_bench_model,
        make_engine,
        timed_batch,
        timed_request,
    )

    torch.set_num_threads(threads)
    opts = BenchOptions(model=model, threads=threads, dtype=dtype)
    bm = load_bench_model(opts, quantization=quantization)
    vocab = min(150000, bm.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    if batch > 1:
        n = PROMPTS[0][0]
        eng = make_engine(bm, max_num_seqs=batch, max_model_len=n + BATCH_STEPS + batch + 8,
                          enable_prefix_caching=False)  # fmt: skip
        prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for _ in range(batch)]
        timed_batch(eng, [p[:16] for p in prompts], 3, "warm")
        steps = timed_batch(eng, prompts, BATCH_STEPS, "b")
        print(f"{statistics.median(steps) * 1e3:.3f}", flush=True)
        return
    eng = make_engine(bm, max_num_seqs=1, max_model_len=2300, enable_prefix_caching=False)
    out = []
    for n, new in PROMPTS:
        prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
        timed_request(eng, prompt[:16], 4, f"warm{n}")
        _, steps, _ = timed_request(eng, prompt, new, f"r{n}")
        out.append(statistics.median(steps) * 1e3)
    print(" ".join(f"{v:.3f}" for v in out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", metavar="REV", help="the git revision to compare with")
    ap.add_argument("--quantization", default=None, help="int8 / int4 / fp8 / bf16 (default none)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="Qwen3.5-0.8B",
                    help="catalog name or config.json (random weights), e.g. the MoE peers model "
                         "of bench/moe_decode.py --write-config")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--dtype", default="auto", help="compute dtype (default auto)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one_round(a.quantization, a.threads, a.model, a.batch, a.dtype)
        return
    if not a.baseline:
        ap.error("--baseline REV is required")
    from qwen35.benchmarks.common import alternate_with_revision  # (the child may predate it)

    cmd = [__file__, "--one", "--threads", str(a.threads), "--model", a.model,
           "--batch", str(a.batch), "--dtype", a.dtype]  # fmt: skip
    if a.quantization:
        cmd += ["--quantization", a.quantization]
    prompts = PROMPTS if a.batch == 1 else PROMPTS[:1]
    times = alternate_with_revision(a.baseline, a.rounds, cmd, len(prompts))
    if a.batch > 1:
        print(f"{a.batch} sequences decoding together:")
    for i, (n, _) in enumerate(prompts):
        new = [t[i] for t in times["new"]]
        old = [t[i] for t in times["base"]]
        ratios = ", ".join(f"{o / v:.2f}" for v, o in zip(new, old, strict=True))
        print(f"after {n} tokens: median {statistics.median(new):.2f} vs {statistics.median(old):.2f}"
              f" ms per step (base / new per round: {ratios})")  # fmt: skip


if __name__ == "__main__":
    main()
