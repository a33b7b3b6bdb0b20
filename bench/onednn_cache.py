"""oneDNN's cache capacities against resident memory and prefill speed, CPU.

    python bench/onednn_cache.py MODEL_DIR [--capacities 1024,128] [--prompts 300] [--rounds 2]

Each round runs one process per capacity (alternating; ONEDNN_PRIMITIVE_CACHE_CAPACITY, oneDNN's
primitive cache, and LRU_CACHE_CAPACITY, ideep's cache of matmul parameters, set before the engine
starts) that prefills the same prompts of random lengths (20-700 tokens, one
token generated each): prefill tokens/s and how much resident memory grew from the engine's
start (after malloc_trim, so glibc's kept heap is not counted). oneDNN compiles a kernel for
every new row count of every weight shape; the engine's default (engine/runtime.py
ONEDNN_CACHE_CAPACITY) keeps fewer than oneDNN's 1,024.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import time

from qwen35.heap import proc_bytes


def rss_mib() -> float:
    return (proc_bytes("/proc/self/status", "VmRSS") or float("nan")) / 2**20


def child(model: str, prompts: int) -> dict:
    from qwen35.engine.llm_engine import LLM
    from qwen35.request import SamplingParams

    llm = LLM(model, max_model_len=4096, verbose=False)
    rng = random.Random(0)
    lengths = [rng.randrange(20, 700) for _ in range(prompts)]
    start = rss_mib()
    t = time.perf_counter()
    for n in lengths:
        llm.generate([[rng.randrange(100, 90000) for _ in range(n)]], SamplingParams(max_tokens=1))
    dt = time.perf_counter() - t
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {"tokens": sum(lengths), "tok_s": sum(lengths) / dt, "rss_growth_mib": rss_mib() - start}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--capacities", default="1024,128")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.prompts)))
        return {}
    caps = [int(c) for c in args.capacities.split(",")]
    runs: dict[int, list[dict]] = {c: [] for c in caps}
    for r in range(args.rounds):
        for c in caps if r % 2 == 0 else caps[::-1]:
            env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(c), "LRU_CACHE_CAPACITY": str(c)}
            out = subprocess.run([sys.executable, __file__, args.model, "--child", "--prompts",
                                  str(args.prompts)], env=env, capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
            runs[c].append(json.loads(out.strip().splitlines()[-1]))
            d = runs[c][-1]
            print(f"round {r} capacity {c}: {d['tok_s']:.0f} prefill tok/s, resident "
                  f"+{d['rss_growth_mib']:.0f} MiB", flush=True)  # fmt: skip
    for c in caps:
        print(f"capacity {c}: median {statistics.median(d['tok_s'] for d in runs[c]):.0f} tok/s, "
              f"+{statistics.median(d['rss_growth_mib'] for d in runs[c]):.0f} MiB")
    return runs


if __name__ == "__main__":
    main()
