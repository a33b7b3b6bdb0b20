"""Tensor parallelism on the CPU: one process vs 2 ranks (gloo) on the same checkpoint.

    python bench/tensor_parallel.py [--rounds 3] [--hidden 1024] [--layers 8] [--tokens 32]

Writes a random checkpoint (transformers' Qwen 3.5 code, fp32, tests/tiny.py) of a mid-size
config, starts both engines once, then per round runs each workload on each engine,
interleaved: batch-1 decode (one prompt, --tokens greedy tokens) and a batch of 8 mixed-length
prompts. Reports medians of tokens/s, and checks both engines emit the same tokens. On a CPU
the ranks share the cores (each rank gets cores / tp threads); the point is that the sharded
engine is exact and what it costs, not a speed-up. Writes bench/results/tensor_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def checkpoint(path: Path, hidden: int, layers: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_checkpoint

    save_checkpoint(
        path, layout="text", vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
        linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64,
        intermediate_size=3 * hidden,
    )  # fmt: skip


def timed(llm, prompts, tokens: int, threads: int) -> tuple[float, list[list[int]]]:
    from qwen35.request import SamplingParams

    torch.set_num_threads(threads)  # both engines live in this process: set it per run
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    return len(prompts) * tokens / wall, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    from qwen35.engine.llm_engine import LLM

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        checkpoint(path, args.hidden, args.layers)
        kw = dict(dtype=args.dtype, verbose=False, max_memory="4GiB", max_num_seqs=8)
        engines = {
            "1 process": (LLM(str(path), **kw), cores),
            # the same engine on one thread: each rank of tp=2 has one, and a loaded machine
            # penalises multi-threaded GEMMs (threads wait at barriers for descheduled peers)
            "1 proc 1 thr": (None, 1),
            "tp=2": (LLM(str(path), tensor_parallel_size=2, **kw), max(1, cores // 2)),
        }
        rng = random.Random(0)
        single = [[rng.randrange(2, 32000) for _ in range(16)]]
        batch = [[rng.randrange(2, 32000) for _ in range(rng.randrange(8, 200))] for _ in range(8)]
        rates: dict[tuple[str, str], list[float]] = {}
        tokens: dict[tuple[str, str], list] = {}
        for r in range(args.rounds):
            for wl, prompts in (("decode batch 1", single), ("batch 8", batch)):
                for name, (llm, threads) in engines.items():
                    llm = llm or engines["1 process"][0]
                    rate, toks = timed(llm, prompts, args.tokens, threads)
                    rates.setdefault((wl, name), []).append(rate)
                    tokens[(wl, name)] = toks
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        engines["tp=2"][0].engine.shutdown()
    rows = []
    print(f"{'workload':<16}{'engine':<14}{'tok/s (median)':>16}  same tokens as 1 process")
    for (wl, name), vals in rates.items():
        same = tokens[(wl, name)] == tokens[(wl, "1 process")]
        rows.append({"workload": wl, "engine": name, "tokens_per_s": statistics.median(vals),
                     "all": vals, "same_tokens": same})  # fmt: skip
        print(f"{wl:<16}{name:<14}{statistics.median(vals):>16.1f}  {same}")
    out = ROOT / "bench" / "results" / "tensor_parallel.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"args": vars(args), "cpu_count": cores, "torch": torch.__version__, "rows": rows}
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_out.replace(out)


if __name__ == "__main__":
    main()
