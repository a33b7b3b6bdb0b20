"""What the load-time NaN / inf check costs (weights.check_finite): the count alone against
torch's isfinite on the same tensor, then whole loads of a checkpoint with the check and with it
replaced by a no-op, alternating, `--rounds` times (the checkpoint read from the page cache after
the first load, so the check's share is the largest it gets).

    python bench/nonfinite_check.py MODEL_DIR [--rounds 3] [--quantization int4]
    python bench/nonfinite_check.py Qwen3.5-0.8B --write DIR   # random weights written to DIR first

`--write DIR`: MODEL is a catalog name; its random bf16 weights are written to DIR (a checkpoint
directory the loader reads: config.json, safetensors shards, index) and loaded from there.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from qwen35 import weights
from qwen35.loader import load_model


def write_random(name: str, out: Path) -> Path:
    from qwen35.benchmarks.common import BenchOptions, load_bench_model
    from qwen35.benchmarks.parallel import checkpoint_dir

    opts = BenchOptions(model=name, dtype="bf16")
    bm = load_bench_model(opts)
    shutil.move(checkpoint_dir(bm, opts), out)  # (its temporary directory)
    return out


def count_rate(numel: int) -> dict:
    """ms and GB/s of count_nonfinite and of torch's isfinite over one bf16 tensor."""
    t = torch.randn(numel).bfloat16()
    out = {}
    for name, fn in (("count_nonfinite", weights.count_nonfinite),
                     ("torch isfinite", lambda x: int((~torch.isfinite(x)).sum()))):  # fmt: skip
        fn(t)
        s = time.perf_counter()
        n = fn(t)
        dt = time.perf_counter() - s
        out[name] = dt
        print(f"{name:16s} {dt * 1e3:8.1f} ms  {t.numel() * 2 / dt / 1e9:6.1f} GB/s  ({n} found)")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="checkpoint directory (or a catalog name with --write)")
    ap.add_argument("--write", default=None, help="write MODEL's random weights here first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--count-numel", type=int, default=1 << 28, help="count_rate's tensor size")
    args = ap.parse_args(argv)
    d = write_random(args.model, Path(args.write)) if args.write else Path(args.model)
    rates = count_rate(args.count_numel)
    check, noop = weights.check_finite, (lambda *a, **k: False)
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    try:
        for _ in range(args.rounds):
            for mode in times:
                weights.check_finite = check if mode == "checked" else noop
                s = time.perf_counter()
                model = load_model(d, dtype=args.dtype, quantization=args.quantization)
                times[mode].append(time.perf_counter() - s)
                assert model.load_report.nonfinite_checked == (mode == "checked") or \
                    weights.count_nonfinite(torch.zeros(1)) is None  # fmt: skip
                del model
    finally:
        weights.check_finite = check
    for mode, ts in times.items():
        print(f"load {mode:9s} median {statistics.median(ts):.3f} s  "
              f"rounds {', '.join(f'{t:.3f}' for t in ts)}")  # fmt: skip
    return {"count_seconds": rates, "load_seconds": times}


if __name__ == "__main__":
    main()
