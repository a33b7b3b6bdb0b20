"""Total tokens/s of 32 requests with mixed lengths: continuous batching vs static batches.

The requests (seeded): prompt lengths uniform in 64..1024, output lengths uniform in 32..256,
random token ids, greedy, EOS ignored so every request produces exactly its output length.
Ours: all added at once, the engine steps until every one finishes. transformers: static
batches of `hf_batch_size` requests in order, left-padded, each batch generating the longest
output of its members. Both count only the requested tokens (no padding, no overshoot):
  generated tokens/s = sum(output lengths) / wall,  total tokens/s = sum(prompt + output) / wall.
The two runs interleave: after each of transformers' batches our engine steps on until it has
generated the same fraction of its tokens, so a slow phase of a shared machine hits both alike.
Our wall time is the sum of its steps; the engine keeps its state between the slices.
"""

from __future__ import annotations

import os
import random
import time

from qwen35.benchmarks.common import BenchModel, BenchOptions, goal, make_engine, ratio
from qwen35.benchmarks.roofline import measure_read_bandwidth
from qwen35.request import SamplingParams


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"requests": opts.requests or 8, "prompt": (8, 64), "output": (4, 16)}
    return {"requests": opts.requests or 32, "prompt": (64, 1024), "output": (32, 256)}


def make_requests(n: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p, o = rng.randint(*prompt), rng.randint(*output)
        reqs.append(([rng.randrange(vocab) for _ in range(p)], o))
    return reqs


class OursRun:
    """Our engine with every request added at once, stepped in slices."""

    def __init__(self, bm: BenchModel, reqs, max_num_seqs: int):
        longest = max(len(p) + o for p, o in reqs)
        self.engine = make_engine(bm, max_num_seqs=max_num_seqs, max_model_len=longest)
        for i, (prompt, out_len) in enumerate(reqs):
            sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
            self.engine.add_request(f"tp-{i}", prompt, sp)
        self.wall, self.steps, self.generated = 0.0, 0, 0

    def run_until(self, generated: float) -> None:
        """Step until `generated` tokens have come out (or every request finished)."""
        engine = self.engine
        while engine.has_unfinished_requests() and self.generated < generated:
            t0 = time.perf_counter()
            for o in engine.step():
                self.generated += sum(len(c.token_ids) for c in o.outputs)
            self.wall += time.perf_counter() - t0
            self.steps += 1

    def result(self) -> dict:
        stats = self.engine.get_stats()
        return {
            "wall_s": self.wall,
            "steps": self.steps,
            "generated_tokens": self.generated,
            "preemptions": stats["num_preemptions"],
        }


def hf_batch(bm: BenchModel, group) -> tuple[float, int]:
    """One static batch through transformers: (wall seconds, tokens computed incl. padding)."""
    from qwen35.benchmarks.hf_baseline import hf_generate

    longest_out = max(o for _, o in group)
    toks, _, wall = hf_generate(bm.hf, [p for p, _ in group], longest_out)
    return wall, len(group) * (max(len(p) for p, _ in group) + toks.shape[1])


def run_throughput(bm: BenchModel, opts: BenchOptions) -> dict:
    sz = sizes(opts)
    reqs = make_requests(
        sz["requests"], sz["prompt"], sz["output"], bm.config.vocab_size, opts.seed
    )
    prompt_tokens = sum(len(p) for p, _ in reqs)
    output_tokens = sum(o for _, o in reqs)
    total = prompt_tokens + output_tokens
    bw_mib = 128 if opts.quick else 512
    bandwidth = [measure_read_bandwidth(bw_mib, device=bm.device)]
    bs = opts.hf_batch_size
    groups = [reqs[b : b + bs] for b in range(0, len(reqs), bs)] if opts.baseline else []
    rounds = max(1, len(groups))
    ours_run = OursRun(bm, reqs, max_num_seqs=len(reqs))
    hf_wall, computed = 0.0, 0
    for r in range(rounds):
        t_ours = ours_run.wall
        ours_run.run_until(output_tokens * (r + 1) / rounds)
        msg = f"  round {r + 1} of {rounds}: qwen35 {ours_run.wall - t_ours:.1f} s"
        if groups:
            w, n = hf_batch(bm, groups[r])
            hf_wall, computed = hf_wall + w, computed + n
            msg += f", transformers batch of {len(groups[r])} {w:.1f} s"
        opts.say(msg)
        bandwidth.append(measure_read_bandwidth(bw_mib, device=bm.device))
    ours_run.run_until(float("inf"))  # (nothing left: the last round ran to the end)
    ours = ours_run.result()
    del ours_run
    ours["generated_tokens_per_s"] = output_tokens / ours["wall_s"]
    ours["total_tokens_per_s"] = total / ours["wall_s"]
    hf = None
    if groups:
        hf = {"wall_s": hf_wall, "batches": len(groups), "computed_tokens_incl_padding": computed}
        hf["batch_size"] = bs
        hf["generated_tokens_per_s"] = output_tokens / hf_wall
        hf["total_tokens_per_s"] = total / hf_wall
    speedup = ratio(ours["total_tokens_per_s"], hf and hf["total_tokens_per_s"])
    return {
        "requests": len(reqs),
        "prompt_len_range": list(sz["prompt"]),
        "output_len_range": list(sz["output"]),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "interleaved_rounds": rounds,
        # drift of the machine across the workload: before the first round and after each
        "read_bandwidth_gbps": [b / 1e9 for b in bandwidth],
        "load_average_end": list(os.getloadavg()),
        "ours": ours,
        "transformers": hf,
        "speedup_vs_transformers": speedup,
        "goals": [goal("throughput_vs_transformers", speedup)],
    }
