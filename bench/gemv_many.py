"""A MoE layer's expert GEMVs in one call (gemv_cpu.cpp `linear_int8_many` / `linear_bf16_many`,
fp8_cpu.cpp `fp8_linear_many`): this checkout's kernels against a git revision's (int8, bf16), or
(fp8) the one call against one `fp8_linear` call a product, interleaved in one process.

    python bench/gemv_many.py --baseline REV [--formats int8 bf16] [--experts 8] [--rounds 9]
                              [--threads 2] [--shapes 2048x512 1024x2048]
    python bench/gemv_many.py --formats fp8

Each product: one input row (a decode token) against an [N, K] weight, `--experts` of them a call
(the down projections of Qwen3.5-35B-A3B's experts are 2048 x 512, their gate_up 1024 x 2048);
16 sets of weights cycled so that every call reads from memory. int8: int8 weights, fp32 rows
(the AVX2 path on CPUs without AVX512); bf16: bf16 weights, fp32 rows (`--dtype auto` on such
CPUs); fp8: block-FP8 weights, fp32 rows (fp8_cpu.cpp's AVX2 kernel). The two sides' outputs are
checked bitwise equal; prints medians and GB/s of weight read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from qwen35.benchmarks.common import kernel_sources_at
from qwen35.kernels import fp8, gemv

SETS = 16  # weight sets cycled (~16 x 8 MB per shape: out of the caches)


def calls(fmt: str, experts: int, n: int, k: int):
    """(fn(module, set index), bytes a call) for one format and shape."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, k, generator=g) for _ in range(experts)]
    if fmt == "fp8":
        from qwen35.quant import formats

        ps = [[formats.quantize_fp8_blocks(torch.randn(n, k, generator=g) * 0.05)
               for _ in range(experts)] for _ in range(SETS)]  # fmt: skip
        ws = [[p[0] for p in one_set] for one_set in ps]
        ss = [[p[1].float() for p in one_set] for one_set in ps]

        def one(m, i):  # "ours": the one call; "base": one call a product
            if m == "many":
                return fp8.load().fp8_linear_many(xs, ws[i], ss[i], 128, 128)
            return torch.cat([fp8.load().fp8_linear(x, w, s, 128, 128)
                              for x, w, s in zip(xs, ws[i], ss[i], strict=True)])  # fmt: skip

        return one, experts * n * k
    if fmt == "int8":
        ws = [[torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
               for _ in range(experts)] for _ in range(SETS)]  # fmt: skip
        sc = [torch.rand(n, generator=g) for _ in range(experts)]
        return (lambda m, i: m.linear_int8_many(xs, ws[i], sc, False)), experts * n * k
    ws = [[torch.randn(n, k, generator=g).bfloat16() for _ in range(experts)] for _ in range(SETS)]
    return (lambda m, i: m.linear_bf16_many(xs, ws[i], False)), experts * n * k * 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="the git revision to compare (int8, bf16)")
    ap.add_argument("--formats", nargs="+", default=["int8", "bf16"],
                    choices=["int8", "bf16", "fp8"])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["2048x512", "1024x2048"], help="N x K")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    new = gemv.load()
    if new is None or ("fp8" in args.formats and fp8.load() is None):
        raise SystemExit("the kernels did not build here (no compiler / AVX2)")
    base = None
    if set(args.formats) - {"fp8"}:
        if args.baseline is None:
            raise SystemExit("int8 / bf16 compare with a git revision: give --baseline REV")
        base = gemv.GEMV.from_folder(kernel_sources_at(args.baseline, tempfile.mkdtemp())).load()
    for fmt in args.formats:
        mods = {"ours": "many", "base": "each"} if fmt == "fp8" else {"ours": new, "base": base}
        for shape in args.shapes:
            n, k = (int(v) for v in shape.split("x"))
            fn, nbytes = calls(fmt, args.experts, n, k)
            if not torch.equal(fn(mods["ours"], 0), fn(mods["base"], 0)):
                raise SystemExit(f"{fmt} {shape}: the two builds' outputs differ")
            ms: dict[str, list[float]] = {name: [] for name in mods}
            for r in range(args.rounds):  # the order alternates by round
                for name in mods if r % 2 == 0 else list(mods)[::-1]:
                    ts = []
                    for i in range(SETS):
                        t0 = time.perf_counter()
                        fn(mods[name], i)
                        ts.append(time.perf_counter() - t0)
                    ms[name].append(statistics.median(ts))
            med = {name: statistics.median(v) for name, v in ms.items()}
            cells = ", ".join(f"{name} {t * 1e3:.3f} ms ({nbytes / t / 1e9:.1f} GB/s)"
                              for name, t in med.items())  # fmt: skip
            label = " (ours: one call; base: one call a product)" if fmt == "fp8" else ""
            print(f"{fmt} {args.experts} x [{n} x {k}]{label}: {cells}, ours / base "
                  f"{med['base'] / med['ours']:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
