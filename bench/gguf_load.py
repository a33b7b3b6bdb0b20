"""Loading a GGUF file (or any checkpoint directory: a compressed-tensors / GPTQ / AWQ one read
by its codes): a fresh process's import + `load_model(FILE, quantization=...)`, this checkout
against a git revision (a temporary worktree), processes alternated (one untimed load of each
first: the page cache, the cached model directory, the worktree's CPU kernel builds).

    python bench/gguf_load.py FILE.gguf --baseline REV [--quantization int4] [--rounds 3]
    python bench/gguf_load.py FILE.gguf --baseline REV --first-use   # the model directory only,
                                                   # made afresh each run (an empty cache)

Prints the seconds of each run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import sys, time
t = time.perf_counter()
from qwen35.loader import load_model
load_model(sys.argv[1], dtype="bf16", quantization=sys.argv[2] or None)
print(time.perf_counter() - t)
"""
# a file's first use: its model directory (header, config, vocabulary check, tensor table)
FIRST_USE = """
import sys, time
t = time.perf_counter()
from qwen35.gguf_checkpoint import model_dir
model_dir(sys.argv[1])
print(time.perf_counter() - t)
"""


def _load_s(src: Path, file: str, quantization: str, first_use: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory() as cache:
        if first_use:  # (an empty cache: the model directory is made again)
            env["QWEN35_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, "-c", FIRST_USE if first_use else CHILD, file,
                              quantization], check=True, capture_output=True, text=True,
                             env=env)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--baseline", required=True, metavar="REV")
    ap.add_argument("--quantization", default="int4", help="'' for the file's default storage")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--first-use", action="store_true",
                    help="time the file's model directory made afresh instead of the load")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base),
                        a.baseline], check=True)  # fmt: skip
        try:
            srcs = {"ours": ROOT / "src", a.baseline: base / "src"}
            for src in srcs.values():  # untimed: page cache, model dir, the kernels' builds
                _load_s(src, a.file, a.quantization, a.first_use)
            times: dict[str, list[float]] = {k: [] for k in srcs}
            for r in range(a.rounds):
                for k in list(srcs)[:: 1 if r % 2 == 0 else -1]:
                    times[k].append(_load_s(srcs[k], a.file, a.quantization, a.first_use))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(json.dumps({"file": Path(a.file).name,
                      "timed": "first use" if a.first_use else f"load {a.quantization}",
                      "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                      "median": med}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
