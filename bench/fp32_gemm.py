"""fp32 GEMMs on the CPU: MKL's sgemm (torch's F.linear) vs oneDNN's (layers/linear.py `gemm`,
torch.ops.mkldnn._linear_pointwise), interleaved in one process. This is what sets
layers/linear.py `onednn_fp32` (QWEN35_FP32_GEMM).

    python bench/fp32_gemm.py [--rows 32,256,2048] [--prefill 512,2048] [--engines fp32,fp32+bf16]
                              [--threads 2] [--rounds 3]

1. The Qwen3.5-0.8B's projections alone (gate_up 7168 x 1024, down 1024 x 3584, DeltaNet in_proj
   8192 x 1024, out_proj 1024 x 2048) at --rows rows: ms per call and GFLOP/s of each library.
2. Whole prefills of --prefill tokens through the engine (random weights; fp32 weights, and fp32
   compute on bf16-stored ones, `--quantization bf16`, what `--dtype auto` runs on CPUs without
   native bf16), the two libraries alternating round by round: tokens/s and the ratio.
Results compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from qwen35.layers import linear as lin

SHAPES = {"gate_up": (7168, 1024), "down": (1024, 3584), "in_proj": (8192, 1024),
          "out_proj": (1024, 2048)}  # fmt: skip
LIBS = ("mkl", "onednn")


def use(lib: str) -> None:
    """Switch `gemm` (and so the engine) to `lib` for what runs next."""
    os.environ[lin.FP32_GEMM_ENV] = lib
    lin.onednn_fp32.cache_clear()
    if (lib == "onednn") != lin.onednn_fp32():
        raise SystemExit("oneDNN's linear is not available in this torch build")


def ops(rows: list[int], rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.02
        for m in rows:
            x = torch.randn(m, k, generator=g)
            reps = max(2, int(2e9 // (2 * m * n * k)))
            t = {lib: [] for lib in LIBS}
            for r in range(rounds):
                for lib in LIBS if r % 2 == 0 else LIBS[::-1]:
                    use(lib)
                    lin.gemm(x, w)  # warm
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        lin.gemm(x, w)
                    t[lib].append((time.perf_counter() - t0) / reps)
            med = {lib: statistics.median(v) for lib, v in t.items()}
            gf = {lib: 2 * m * n * k / v / 1e9 for lib, v in med.items()}
            use("onednn")
            diff = (lin.gemm(x, w) - F.linear(x, w)).abs().max().item()
            print(f"{name:9s} [{n} x {k}] {m:5d} rows: mkl {med['mkl'] * 1e3:8.2f} ms "
                  f"({gf['mkl']:4.0f} GFLOP/s), onednn {med['onednn'] * 1e3:8.2f} ms "
                  f"({gf['onednn']:4.0f}): {med['mkl'] / med['onednn']:.2f}x; max |diff| {diff:.1e}",
                  flush=True)  # fmt: skip


def prefills(lengths: list[int], engines: list[str], rounds: int) -> None:
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine, timed_request

    vocab = 150000
    g = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths}
    for name in engines:
        quant = "bf16" if name == "fp32+bf16" else None
        bm = load_bench_model(BenchOptions(dtype="fp32"), quantization=quant)
        eng = make_engine(bm, max_num_seqs=1, max_model_len=max(lengths) + 8,
                          max_num_batched_tokens=max(lengths), enable_prefix_caching=False)  # fmt: skip
        timed_request(eng, prompts[lengths[0]][:64], 1, "warm")
        for n in lengths:
            t = {lib: [] for lib in LIBS}
            for r in range(rounds):
                for lib in LIBS if r % 2 == 0 else LIBS[::-1]:
                    use(lib)
                    pre, _, _ = timed_request(eng, prompts[n], 1, f"{name}-{n}-{r}-{lib}")
                    t[lib].append(pre)
            med = {lib: statistics.median(v) for lib, v in t.items()}
            print(f"{name} prefill {n} tokens: mkl {n / med['mkl']:7.1f} tok/s, onednn "
                  f"{n / med['onednn']:7.1f} tok/s: {med['mkl'] / med['onednn']:.2f}x "
                  f"(per round: {', '.join(f'{a / b:.2f}' for a, b in zip(t['mkl'], t['onednn'], strict=True))})",
                  flush=True)  # fmt: skip
        del eng, bm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="32,256,2048", help="op-level rows ('' to skip)")
    ap.add_argument("--prefill", default="512,2048", help="prompt lengths ('' to skip)")
    ap.add_argument("--engines", default="fp32,fp32+bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from qwen35.benchmarks.common import cpu_description

    torch.set_num_threads(a.threads)
    print(f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if a.rows:
        ops([int(r) for r in a.rows.split(",")], a.rounds)
    if a.prefill:
        prefills([int(n) for n in a.prefill.split(",")], a.engines.split(","), a.rounds)


if __name__ == "__main__":
    main()
