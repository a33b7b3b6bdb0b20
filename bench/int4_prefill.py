"""int4 weights at many input rows (prefill, batched decode) with 8-bit activations (x8): the
kernel (`int4_cpu.cpp` `linear_int4`: integer sums; past 4 rows an item, the AVX2 path's panel)
against what long inputs took before, the K-major unpack + int4_x8_round + an fp32 GEMM
(`int4_dequant`, F.linear), and optionally a git revision's kernel (whose `linear_int4` may
refuse more than 16 rows: those cells are left out), interleaved in one process.

    python bench/int4_prefill.py [--rows 4 16 64 512 2048] [--shapes 7168x1024 1024x3584]
                                 [--baseline REV] [--rounds 3] [--threads 2] [--avx2-only]
    python bench/int4_prefill.py --engine Qwen3.5-0.8B [--tokens 2048] [--rounds 6]   # whole prefills

Shapes N x K: Qwen3.5-0.8B's gate_up (7,168 x 1,024) and down (1,024 x 3,584) projections, groups
of 128, fp32 rows (`--dtype auto` on CPUs without native bf16; `--dtype bf16`: bf16 rows, a bf16
GEMM). The kernel's outputs are checked
bitwise against the baseline's and within 1e-5 of the GEMM's; prints medians, GOP/s (2 M N K a
call) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from qwen35.benchmarks.common import kernel_sources_at, median_seconds
from qwen35.kernels import gemv
from qwen35.quant.layers import Int4Linear


def _median_ms(fn, reps: int) -> float:
    return median_seconds(fn, reps) * 1e3


def one_count(mod, base, lin: Int4Linear, x: torch.Tensor, args) -> None:
    """Times the paths at x's row count against one weight; prints a line."""
    packed, sz = lin.weight, lin.scales_and_zeros.contiguous()
    (m, k), n = x.shape, lin.out_features
    wt = torch.empty(k, n, dtype=x.dtype)  # W^T, K-major: int4_linear's buffer

    def gemm():
        mod.int4_dequant(packed, sz, 128, wt.t())
        return F.linear(mod.int4_x8_round(x), wt.t())

    def ours(m=mod):
        return m.linear_int4(x, packed, sz, 128, n, args.avx2_only, True)

    fns = {"kernel": ours, "gemm": gemm}
    y = ours()
    err = ((y.float() - gemm().float()).abs().max() / y.float().abs().max()).item()
    if err > (1e-5 if x.dtype == torch.float32 else 1e-2):  # bf16: the outputs' rounding
        raise SystemExit(f"[{n} x {k}] at {m} rows: the kernel is {err:.1e} off the GEMM")
    if base is not None:
        try:
            yb = ours(base)
        except RuntimeError:  # that revision refuses this many rows
            yb = None
        if yb is not None:
            if not torch.equal(y, yb):
                raise SystemExit(f"[{n} x {k}] at {m} rows: the two builds' outputs differ")
            fns["base"] = lambda: ours(base)
    ms: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):  # the order alternates by round
        for name in fns if r % 2 == 0 else list(fns)[::-1]:
            ms[name].append(_median_ms(fns[name], args.reps))
    med = {name: statistics.median(v) for name, v in ms.items()}
    cells = ", ".join(f"{name} {t:.2f} ms ({2 * m * n * k / t / 1e6:.0f} GOP/s)"
                      for name, t in med.items())  # fmt: skip
    ratios = ", ".join(f"kernel / {name} {med[name] / med['kernel']:.2f}x"
                       for name in med if name != "kernel")  # fmt: skip
    print(f"[{n} x {k}] {m} rows: {cells}; {ratios}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[4, 16, 64, 512, 2048])
    ap.add_argument("--shapes", nargs="+", default=["7168x1024", "1024x3584"], help="N x K")
    ap.add_argument("--baseline", metavar="REV", help="also the int4 kernel of this revision")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the rows' dtype (bf16: `--dtype auto` on AVX512-BF16 CPUs; the GEMM then "
                    "bf16 on a bf16 unpack)")
    ap.add_argument("--avx2-only", action="store_true",
                    help="the AVX2 path on any CPU (AVX512-VNNI CPUs run their own otherwise)")
    ap.add_argument("--engine", metavar="MODEL",
                    help="a catalog model or config.json: whole prefills of one prompt under "
                    "--quantization int4 instead, the kernel rule and dequantise + GEMM alternating")
    ap.add_argument("--tokens", type=int, default=2048, help="--engine: the prompt's tokens")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine:
        return engine_prefills(args)
    torch.set_flush_denormal(True)
    mod = gemv.load_int4()
    if mod is None:
        raise SystemExit("the int4 kernel did not build here (no compiler / AVX2)")
    base = None
    if args.baseline:
        base = gemv.INT4.from_folder(kernel_sources_at(args.baseline, tempfile.mkdtemp())).load()
        if base is None:
            raise SystemExit(f"the kernels of {args.baseline} did not build here")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        dt = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        lin = Int4Linear.quantize((torch.randn(n, k, generator=g) * 0.02).bfloat16(), 128, dt)
        for m in args.rows:
            one_count(mod, base, lin, torch.randn(m, k, generator=g).to(dt), args)


def engine_prefills(args) -> None:
    """One `--tokens` prompt prefilled by the engine (int4 weights, random, the engine's dtype),
    `--rounds` x 2 times: long inputs through the kernel where this CPU's rule
    (`quant/matmul.py int4_prefill_in_kernel`) says so, and through dequantise + GEMM (the rule
    patched off), the order alternating by round. Prints medians and gemm / kernel time."""
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.quant import matmul
    from qwen35.request import SamplingParams

    bm = load_bench_model(BenchOptions(model=args.engine, threads=args.threads),
                          quantization="int4")  # fmt: skip
    rule = matmul.int4_prefill_in_kernel
    if not rule():
        print("this CPU prefills int4 by dequantise + GEMM already: both runs are the same path")
    eng = make_engine(bm, max_num_seqs=1, max_model_len=args.tokens + 16,
                      enable_prefix_caching=False, max_num_batched_tokens=args.tokens)  # fmt: skip
    vocab = bm.model.config.vocab_size
    ts: dict[str, list[float]] = {"kernel": [], "gemm": []}
    try:
        for r in range(args.rounds):
            for name in ("kernel", "gemm") if r % 2 == 0 else ("gemm", "kernel"):
                matmul.int4_prefill_in_kernel = rule if name == "kernel" else (lambda: False)
                prompt = [(13 * i + r) % vocab for i in range(args.tokens)]
                eng.add_request(f"{name}{r}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
                t = time.perf_counter()
                while eng.has_unfinished_requests():
                    eng.step()
                ts[name].append(time.perf_counter() - t)
    finally:
        matmul.int4_prefill_in_kernel = rule
    a, b = statistics.median(ts["kernel"]), statistics.median(ts["gemm"])
    print(f"{args.engine} int4 prefill of {args.tokens} tokens: kernel {args.tokens / a:.1f} tok/s, "
          f"gemm {args.tokens / b:.1f} tok/s, gemm / kernel time {b / a:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
