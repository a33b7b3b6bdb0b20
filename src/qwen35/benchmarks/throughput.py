"""Total tokens/s of 32 requests with mixed lengths: continuous batching vs static batches.

The requests (seeded): prompt lengths uniform in 64..1024, output lengths uniform in 32..256,
random token ids, greedy, EOS ignored so every request produces exactly its output length.
Ours: all added at once, the engine steps until every one finishes. transformers: static
batches of `hf_batch_size` requests in order, left-padded, each batch generating the longest
output of its members. Both count only the requested tokens (no padding, no overshoot):
  generated tokens/s = sum(output lengths) / wall,  total tokens/s = sum(prompt + output) / wall.
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


def run_ours(bm: BenchModel, reqs, max_num_seqs: int) -> dict:
    longest = max(len(p) + o for p, o in reqs)
    engine = make_engine(bm, max_num_seqs=max_num_seqs, max_model_len=longest)
    for i, (prompt, out_len) in enumerate(reqs):
        sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        engine.add_request(f"tp-{i}", prompt, sp)
    steps, generated = 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            generated += sum(len(c.token_ids) for c in o.outputs)
        steps += 1
    wall = time.perf_counter() - t0
    stats = engine.get_stats()
    del engine
    return {
        "wall_s": wall,
        "steps": steps,
        "generated_tokens": generated,
        "preemptions": stats["num_preemptions"],
    }


def run_hf(bm: BenchModel, reqs, batch_size: int, say=lambda msg: None) -> dict:
    from qwen35.benchmarks.hf_baseline import hf_generate

    wall, computed, batches = 0.0, 0, 0
    for b in range(0, len(reqs), batch_size):
        group = reqs[b : b + batch_size]
        longest_out = max(o for _, o in group)
        toks, _, w = hf_generate(bm.hf, [p for p, _ in group], longest_out)
        wall += w
        computed += len(group) * (max(len(p) for p, _ in group) + toks.shape[1])
        batches += 1
        say(f"  transformers: batch {batches} of {-(-len(reqs) // batch_size)} in {w:.1f} s")
    return {"wall_s": wall, "batches": batches, "computed_tokens_incl_padding": computed}


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
    ours = run_ours(bm, reqs, max_num_seqs=len(reqs))
    opts.say(f"  qwen35: {ours['wall_s']:.1f} s for {len(reqs)} requests")
    ours["generated_tokens_per_s"] = output_tokens / ours["wall_s"]
    ours["total_tokens_per_s"] = total / ours["wall_s"]
    bandwidth.append(measure_read_bandwidth(bw_mib, device=bm.device))
    hf = None
    if opts.baseline:
        hf = run_hf(bm, reqs, opts.hf_batch_size, opts.say)
        hf["batch_size"] = opts.hf_batch_size
        hf["generated_tokens_per_s"] = output_tokens / hf["wall_s"]
        hf["total_tokens_per_s"] = total / hf["wall_s"]
        bandwidth.append(measure_read_bandwidth(bw_mib, device=bm.device))
    speedup = ratio(ours["total_tokens_per_s"], hf and hf["total_tokens_per_s"])
    return {
        "requests": len(reqs),
        "prompt_len_range": list(sz["prompt"]),
        "output_len_range": list(sz["output"]),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        # drift of the machine across the workload: before ours, after ours, after transformers
        "read_bandwidth_gbps": [b / 1e9 for b in bandwidth],
        "load_average_end": list(os.getloadavg()),
        "ours": ours,
        "transformers": hf,
        "speedup_vs_transformers": speedup,
        "goals": [goal("32-request total tokens/s >= 3x transformers", speedup, 3.0)],
    }
