"""fp32 rows past the CPU kernels' 16: the kernel in 16-row chunks vs dequantising / widening the
weight + torch's fp32 GEMM, per weight format, interleaved in one process. This is what sets
layers/linear.py CHUNKED_MAX_ROWS (the rows of a MoE prefill's experts: ~T/32 each on 35B-A3B).

    python bench/chunked_rows.py [--shapes 1024x2048,2048x512] [--rows 16,24,32,48,64,96,128]
                                 [--formats int8,bf16,fp32,fp8] [--threads 2] [--rounds 5]

Each cell: ms per call (median over rounds of the median of --reps calls), chunks / GEMM, for
the formats' real entry points (layers/linear.py `linear` for bf16-stored and fp32 weights,
quant/matmul.py `int8_linear` / `fp8_linear`), CHUNKED_MAX_ROWS set to the row count or cleared.
Both give each row's result in fp32; results compare only within one run.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from qwen35.benchmarks.common import median_seconds
from qwen35.layers import linear as lin
from qwen35.quant import formats, matmul


def entries(n: int, k: int, fmts: list[str]) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    out = {}
    for f in fmts:
        if f == "int8":
            q, s = formats.quantize_int8_rows(w, torch.float32)
            out[f] = (torch.int8, lambda x, q=q, s=s: matmul.int8_linear(x, q, s))
        elif f == "fp8":
            q, s = formats.quantize_fp8_blocks(w.bfloat16())
            s = s.float()
            out[f] = (q.dtype, lambda x, q=q, s=s: matmul.fp8_linear(x, q, s, (128, 128)))
        else:
            wt = w.bfloat16() if f == "bf16" else w
            out[f] = (wt.dtype, lambda x, wt=wt: lin.linear(x, wt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1024x2048,2048x512", help="N x K, comma-separated")
    ap.add_argument("--rows", default="16,24,32,48,64,96,128")
    ap.add_argument("--formats", default="int8,bf16,fp32,fp8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    saved = dict(lin.CHUNKED_MAX_ROWS)
    rows = [int(r) for r in a.rows.split(",")]
    fmts = a.formats.split(",")
    print(f"{torch.get_num_threads()} threads; ms per call, chunks / GEMM (ratio = GEMM / chunks)")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        fns = entries(n, k, fmts)
        print(f"[{n} x {k}] " + " ".join(f"{f:>22}" for f in fmts))
        for m in rows:
            x = torch.randn(m, k)
            cells = []
            for f in fmts:
                dt, fn = fns[f]
                t = {True: [], False: []}
                for r in range(a.rounds):
                    for on in (True, False) if r % 2 == 0 else (False, True):
                        lin.CHUNKED_MAX_ROWS.clear()
                        if on:
                            lin.CHUNKED_MAX_ROWS[dt] = m
                        t[on].append(median_seconds(lambda fn=fn, x=x: fn(x), a.reps) * 1e3)
                lin.CHUNKED_MAX_ROWS.clear()
                lin.CHUNKED_MAX_ROWS.update(saved)
                c, g = statistics.median(t[True]), statistics.median(t[False])
                cells.append(f"{c:6.2f} / {g:6.2f} {g / c:4.2f}x")
            print(f"{m:>11} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
