"""tp=2 on the CPU with the shared-memory all-reduce vs gloo's, interleaved in one run.

    python bench/tp_allreduce.py [--rounds 4] [--tokens 32] [--hidden 1024] [--layers 8]

The model of bench/tensor_parallel.py (175M parameters, fp32, random weights written once as a
checkpoint). Only one process group can live in a process, so each round starts a tp=2 engine
per all-reduce (QWEN35_TP_ALLREDUCE=gloo for the reference; the worker inherits it), runs
batch-1 decode and a batch of 8 mixed-length prompts on it, and stops it; one process on 2 and
on 1 thread runs in the same round. Prints the per-round generated tokens/s and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tensor_parallel import config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.benchmarks.parallel import generate, parallel_engine
    from qwen35.parallel import shm

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config(args.hidden, args.layers)))
        opts = BenchOptions(model=str(path), dtype="fp32")
        bm = load_bench_model(opts)
        rng = random.Random(0)
        V = bm.config.vocab_size
        workloads = {
            "decode batch 1": [[rng.randrange(V) for _ in range(16)]],
            "batch 8": [[rng.randrange(V) for _ in range(rng.randrange(8, 200))] for _ in range(8)],
        }
        kw = dict(max_num_seqs=8, max_model_len=256 + args.tokens)
        cores = torch.get_num_threads()
        one = make_engine(bm, **kw)
        rates: dict[tuple[str, str], list[float]] = {}

        def measure(name, eng, threads):
            torch.set_num_threads(threads)
            for wl, prompts in workloads.items():
                generate(eng, prompts[:1], 2)  # warm-up
                rate, _ = generate(eng, prompts, args.tokens)
                rates.setdefault((wl, name), []).append(rate)

        for r in range(args.rounds):
            measure(f"1 process, {cores} threads", one, cores)
            measure("1 process, 1 thread", one, 1)
            for mode in ("gloo", "shm"):
                os.environ["QWEN35_TP_ALLREDUCE"] = mode
                calls = shm.calls
                par = parallel_engine(bm, opts, 2, **kw)
                try:
                    measure(f"tp=2, {mode} all-reduce", par, max(1, cores // 2))
                finally:
                    par.shutdown()
                assert (shm.calls > calls) == (mode == "shm"), "the all-reduce path was not taken"
            torch.set_num_threads(cores)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    for (wl, name), v in rates.items():
        print(f"{wl:15s} {name:26s} median {statistics.median(v):6.1f} tok/s  rounds "
              + " ".join(f"{x:.1f}" for x in v))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
