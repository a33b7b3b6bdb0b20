"""The fused small CPU ops (`kernels/small_ops_cpu.cpp`) against their PyTorch references, one
process, the two interleaved by round: Qwen3.5-0.8B's shapes at one decode row and at a 512-token
prefill chunk.

    python bench/small_ops.py [--rows 1 512] [--dtype fp32|bf16] [--rounds 5] [--threads 2]

Ops: RMSNorm (hidden 1,024), the DeltaNet gated RMSNorm (16 heads x 128), SiLU * mul (3,584), and
DeltaNet's causal conv + SiLU over a prefill chunk (6,144 channels, 4 taps, from a state; prefill
rows only: decode takes the conv update). Outputs are checked against the reference first
(bf16: equal or within one rounding; fp32: 1e-5). Prints medians in microseconds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from qwen35.benchmarks.common import median_seconds
from qwen35.kernels import small_ops
from qwen35.layers.norms import gated_rms_norm, rms_norm_zc
from qwen35.ops.conv import causal_conv1d
from qwen35.ops.pointwise import silu_mul_reference


def _us(fn, reps: int) -> float:
    return median_seconds(fn, reps) * 1e6


def cases(mod, rows: int, dtype: torch.dtype) -> dict:
    """{name: (kernel fn, reference fn)} at `rows` rows."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w = rand(rows, 1024), rand(1024)
    o, z, wg = rand(rows, 16, 128), rand(rows, 16, 128), rand(128)
    gate, up = rand(rows, 3584), rand(rows, 3584)
    out = {
        "rms_norm": (lambda: mod.rms_norm_zc(x, w, 1e-6), lambda: rms_norm_zc(x, w, 1e-6)),
        "gated_rms_norm": (lambda: mod.gated_rms_norm(o, z, wg, 1e-6),
                           lambda: gated_rms_norm(o, z, wg, 1e-6)),  # fmt: skip
        "silu_mul": (lambda: mod.silu_mul(gate, up), lambda: silu_mul_reference(gate, up)),
    }
    if rows > 1:
        qkv, cw, state = rand(rows, 6144), rand(6144, 4), rand(6144, 3)
        out["causal_conv1d"] = (lambda: mod.causal_conv1d_silu(qkv, cw, state),
                                lambda: causal_conv1d(qkv, cw, state))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 512])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mod = small_ops.load()
    if mod is None:
        raise SystemExit("the small-op kernels did not build here (no compiler / AVX2)")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    for rows in args.rows:
        for name, (fast, ref) in cases(mod, rows, dtype).items():
            torch.testing.assert_close(fast(), ref(), **tol)
            ts: dict[str, list[float]] = {"kernel": [], "reference": []}
            for r in range(args.rounds):  # the order alternates by round
                pair = [("kernel", fast), ("reference", ref)]
                for label, fn in pair if r % 2 == 0 else pair[::-1]:
                    ts[label].append(_us(fn, args.reps))
            k, p = statistics.median(ts["kernel"]), statistics.median(ts["reference"])
            print(f"{name} at {rows} rows ({args.dtype}): kernel {k:.1f} us, reference {p:.1f} us, "
                  f"{p / k:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
