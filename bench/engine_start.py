"""An engine's start on a CPU: seconds in `LLM(...)`, resident memory after it, then one prompt.

    python bench/engine_start.py MODEL_DIR [--prompt 2048] [--rounds 3] [--baseline REV]

Each run is a fresh process: `LLM(MODEL_DIR)` with its defaults (2 GiB of caches on a CPU),
then one greedy request of a `--prompt`-token random prompt and 32 output tokens. Printed per
run: LLM() s, VmRSS after it (MiB), the request's s, VmRSS after it. With --baseline, a git
revision (a temporary worktree) runs in alternating processes too; medians per side. MODEL_DIR:
e.g. random weights from bench/nonfinite_check.py's write_random.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

FIELDS = ("LLM() s", "VmRSS after MiB", "request s", "VmRSS after MiB")


def one_run(model: str, prompt: int) -> list[float]:
    from qwen35.engine.llm_engine import LLM
    from qwen35.heap import proc_bytes
    from qwen35.request import SamplingParams

    t1 = time.perf_counter()
    llm = LLM(model)
    t2 = time.perf_counter()
    rss_start = proc_bytes("/proc/self/status", "VmRSS") / 2**20
    rng = random.Random(0)
    ids = [rng.randrange(1000, 100_000) for _ in range(prompt)]
    t3 = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    t4 = time.perf_counter()
    rss_end = proc_bytes("/proc/self/status", "VmRSS") / 2**20
    return [t2 - t1, rss_start, t4 - t3, rss_end]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="also run this git revision, alternating")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # (one process's run)
    a = ap.parse_args(argv)
    if a.raw:
        print(" ".join(f"{v:.4f}" for v in one_run(a.model, a.prompt)))
        return {}
    from qwen35.benchmarks.common import alternate_with_revision

    argv = [__file__, a.model, "--prompt", str(a.prompt), "--raw"]
    if a.baseline:
        runs = alternate_with_revision(a.baseline, a.rounds, argv, len(FIELDS))
    else:
        import subprocess

        runs = {"new": []}
        for _ in range(a.rounds):
            out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            runs["new"].append([float(v) for v in out.stdout.split()[-len(FIELDS):]])
    for name, rows in runs.items():
        meds = [statistics.median(r[i] for r in rows) for i in range(len(FIELDS))]
        print(f"{name:>5} medians: " + ", ".join(f"{f} {v:.2f}" for f, v in zip(FIELDS, meds, strict=True)))
    return runs


if __name__ == "__main__":
    main()
