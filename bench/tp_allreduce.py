"""tp=2 on the CPU with the shared-memory all-reduce vs gloo's, interleaved in one run.

    python bench/tp_allreduce.py [--rounds 4] [--tokens 32] [--hidden 1024] [--layers 8]
    python bench/tp_allreduce.py --micro     # one all-reduce's latency, 2 ranks, by size; and
                                             # one step broadcast's (+ a 1-float all-reduce)

The model of bench/tensor_parallel.py (175M parameters, fp32, random weights written once as a
checkpoint). Only one process group can live in a process, so each round starts a tp=2 engine
per all-reduce (QWEN35_TP_ALLREDUCE=gloo for the reference, all-reduce and per-step broadcast;
the worker inherits it), runs
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
    ap.add_argument("--micro", action="store_true", help="time single all-reduces instead")
    args = ap.parse_args()
    if args.micro:
        return micro()
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
                calls, bcasts = shm.calls, shm.bcasts
                par = parallel_engine(bm, opts, 2, **kw)
                try:
                    measure(f"tp=2, {mode} all-reduce", par, max(1, cores // 2))
                finally:
                    par.shutdown()
                assert (shm.calls > calls) == (mode == "shm"), "the all-reduce path was not taken"
                assert (shm.bcasts > bcasts) == (mode == "shm"), "the broadcast path was not taken"
            torch.set_num_threads(cores)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    for (wl, name), v in rates.items():
        print(f"{wl:15s} {name:26s} median {statistics.median(v):6.1f} tok/s  rounds "
              + " ".join(f"{x:.1f}" for x in v))  # fmt: skip
    return 0


def micro() -> int:
    """Two spawned ranks (1 thread each) time gloo's and the shared-memory all-reduce."""
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    procs = [ctx.Process(target=_micro_rank, args=(r, init, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for (mode, n), us in out.get().items():
        what = f"all-reduce of {n:6d} fp32" if "bcast" not in mode else "step broadcast + 1-float all-reduce"
        print(f"{mode.split()[0]:5s} {what}: {us:7.1f} us")
    for p in procs:
        p.join()
    return 0


def _micro_rank(rank: int, init: str, out) -> None:
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from qwen35.parallel import shm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    assert shm.setup(60.0), "the shared-memory all-reduce is unavailable here"
    res = {}
    for n in (64, 1024, 8192, 204800):
        x = torch.randn(n)
        for mode, f in (("gloo", dist.all_reduce), ("shm", shm.all_reduce)):
            k = 2000 if n <= 8192 else 200
            for _ in range(20):
                f(x)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(k):
                f(x.mul_(0.5))
            res[(mode, n)] = (time.perf_counter() - t) / k * 1e6
    # the per-step broadcast (a step-like message), each followed by a tiny shm all-reduce so
    # that rank 0 times the delivery, not only its send
    from qwen35.parallel.group import broadcast

    control = dist.new_group(backend="gloo")
    msg = ("step", [], torch.arange(8), {f"f{i}": torch.arange(9) for i in range(12)})
    one = torch.ones(1)
    for mode in ("gloo", "shm"):
        if mode == "gloo":
            os.environ["QWEN35_TP_ALLREDUCE"] = "gloo"
        assert shm.setup(60.0) == (mode == "shm")
        os.environ.pop("QWEN35_TP_ALLREDUCE", None)
        if mode == "gloo":  # the all-reduce of 1 float still through shared memory
            shm.setup(60.0)
            shm._comm, comm = None, shm._comm
        k = 1000
        dist.barrier()
        t = time.perf_counter()
        for _ in range(k):
            broadcast(control, msg if rank == 0 else None)
            if mode == "gloo":
                comm.all_reduce_(one)
            else:
                shm.all_reduce(one)
        res[(f"{mode} bcast", 1)] = (time.perf_counter() - t) / k * 1e6
    if rank == 0:
        out.put(res)
    shm.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
