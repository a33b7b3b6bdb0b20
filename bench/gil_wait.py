"""How long another Python thread waits while the engine works: in `qwen35 serve` the engine steps
on one thread and the HTTP event loop runs on another, so a kernel that kept the GIL would hold
every response, health check and new request for its whole length (kernels/torch_ext.h
QWEN35_NOGIL: ours release it).

    python bench/gil_wait.py [--model Qwen3.5-0.8B] [--prompt 4096] [--step-ms 1000] [--threads 2]

A monitor thread sleeps 2 ms in a loop and records how late it wakes while the engine runs
4 decoding streams and a --prompt-token prompt (--step-ms: the engine's max_decode_step_ms, 0:
whole chunks). Prints the engine's wall time and the lateness's median / p99 / max. To compare
with kernels that keep the GIL, run it on a checkout without QWEN35_NOGIL (the kernels rebuild
per source version), interleaving the two.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
from qwen35.request import SamplingParams


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--step-ms", type=float, default=1000.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bm = load_bench_model(BenchOptions(model=a.model, dtype=a.dtype, threads=a.threads))
    e = make_engine(bm, max_num_seqs=8, max_model_len=a.prompt + 512,
                    max_decode_step_ms=a.step_ms)  # fmt: skip
    g, vocab = torch.Generator().manual_seed(0), bm.config.vocab_size
    e.add_request("warm", list(range(2, 100)), SamplingParams(max_tokens=2))
    while e.has_unfinished_requests():
        e.step()
    lates: list[float] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.002)
            lates.append(time.perf_counter() - t - 0.002)

    th = threading.Thread(target=monitor)
    th.start()
    t0 = time.perf_counter()
    try:
        sp = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        for i in range(4):
            e.add_request(f"s{i}", torch.randint(2, vocab, (64,), generator=g).tolist(), sp)
        for _ in range(3):
            e.step()
        prompt = torch.randint(2, vocab, (a.prompt,), generator=g).tolist()
        e.add_request("long", prompt, SamplingParams(max_tokens=1))
        while e.has_unfinished_requests():
            e.step()
    finally:
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    lates.sort()
    ms = [1000 * x for x in (statistics.median(lates), lates[int(len(lates) * 0.99)], lates[-1])]
    print(f"{a.model} ({bm.label}), {a.prompt}-token prompt beside 4 streams, max_decode_step_ms "
          f"{a.step_ms:g}: engine {wall:.1f} s; the other thread's wake-up lateness median "
          f"{ms[0]:.2f} ms, p99 {ms[1]:.1f} ms, max {ms[2]:.1f} ms ({len(lates)} wake-ups)")  # fmt: skip


if __name__ == "__main__":
    main()
