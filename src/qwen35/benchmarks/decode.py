"""Batch-1 decode tokens/s: our engine vs transformers, against the memory-bandwidth roofline.

Both greedy-decode the same prompt on the same weights; a round runs ours, then transformers,
then a bandwidth pass, so slow phases of a shared machine hit all three alike. Time per token
is the median of the decode steps (not the prefill) over all rounds: for us the wall time of
each `LLMEngine.step()` (scheduler, runner, sampler and detokenizer included), for transformers
the gap between consecutive tokens inside `generate`.

With `--batches B,...` (one process), also batched decode: B sequences of the same prompt length
decoding together in one engine (max_num_seqs=B, its own CUDA graphs on a GPU), the median step
over the rounds; total tokens/s = B / step (the issue's batch-32 figure). Ours only.

With `--scheduler-steps K` (K > 1) our engine runs K decode steps per scheduling round
(num_scheduler_steps, multi-step decoding; a round's time is spread over its K tokens), and a
second engine on the same weights with single steps runs beside it, round by round (batch 1 and
each --batches size): `ours` is the K-step engine, `single_step` the other, and
`multi_step_speedup` their ratio.

With `-tp N` our engine runs on N ranks (benchmarks/parallel.py) and the roofline counts what
rank 0 moves: on GPUs its shard over one GPU's bandwidth (the per-GPU roofline); on a CPU, where
the ranks share one memory bus, N times that.
"""

from __future__ import annotations

import itertools
import random

from qwen35.benchmarks.common import (
    BenchModel,
    BenchOptions,
    goal,
    make_engine,
    median,
    ratio,
    timed_batch,
    timed_request,
)
from qwen35.benchmarks.roofline import (
    decode_bytes_per_step,
    measure_read_bandwidth,
    roofline_tokens_per_s,
)


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"prompt_len": 16, "new_tokens": 8, "rounds": opts.rounds or 1, "bw_mib": 128}
    return {"prompt_len": 128, "new_tokens": 64, "rounds": opts.rounds or 3, "bw_mib": 512}


def _ours(engine, prompt: list[int], new_tokens: int, rid: str) -> tuple[list[float], list[int]]:
    """Per-step wall seconds of one request (step 0 = prefill + first token, all its chunks)
    and its tokens."""
    prefill, steps, tokens = timed_request(engine, prompt, new_tokens, rid)
    return [prefill, *steps], tokens


def run_decode(bm: BenchModel, opts: BenchOptions) -> dict:
    sz = sizes(opts)
    P, N = sz["prompt_len"], sz["new_tokens"]
    n = opts.tensor_parallel_size
    if n > 1:  # our engine on n ranks (the baseline stays one process)
        from qwen35.benchmarks.parallel import parallel_engine

        opts.say(f"starting {n} ranks")
        engine = parallel_engine(bm, opts, n, max_num_seqs=1, max_model_len=P + N + 16)
    else:
        engine = make_engine(bm, max_num_seqs=1, max_model_len=P + N + 16,
                             num_scheduler_steps=opts.scheduler_steps)  # fmt: skip
    single = None  # multi-step decoding's baseline: the same engine with single steps
    if opts.scheduler_steps > 1 and n == 1:
        single = make_engine(bm, max_num_seqs=1, max_model_len=P + N + 16)
    try:
        out = _run(engine, bm, opts, sz, single)
    finally:
        if n > 1:
            engine.shutdown()
    if opts.batches and n == 1:
        del engine
        out["batched"] = _batched(bm, opts, sz)
    return out


def _batched(bm: BenchModel, opts: BenchOptions, sz: dict) -> list[dict]:
    """B sequences decoding together, for each B of --batches: the median step (all rounds)."""
    from qwen35.benchmarks.common import free_memory

    P, N = sz["prompt_len"], sz["new_tokens"]
    rng = random.Random(opts.seed + 1)
    rows = []
    for B in opts.batches:
        opts.say(f"batched decode, {B} sequences")
        free_memory()
        # room for the steps that decode earlier requests while later ones prefill
        ks = [opts.scheduler_steps] + ([1] if opts.scheduler_steps > 1 else [])
        engines = {k: make_engine(bm, max_num_seqs=B, max_model_len=P + 2 * N + 16,
                                  enable_prefix_caching=False, num_scheduler_steps=k)
                   for k in ks}  # fmt: skip
        prompts = [[rng.randrange(bm.config.vocab_size) for _ in range(P)] for _ in range(B)]
        times = {k: [] for k in ks}
        for r in range(sz["rounds"]):  # the engines alternate round by round
            for k, engine in engines.items():
                times[k] += timed_batch(engine, prompts, N, f"b{B}-{r}-k{k}")
        ms = median(times[ks[0]]) * 1e3
        row = {"batch": B, "ms_per_step": ms, "tokens_per_s": B * 1e3 / ms,
               "num_steps_timed": len(times[ks[0]]), "num_scheduler_steps": ks[0],
               "cuda_graphs": engines[ks[0]].runner.graphs is not None}  # fmt: skip
        if len(ks) > 1:
            ms1 = median(times[1]) * 1e3
            row["single_step"] = {"ms_per_step": ms1, "tokens_per_s": B * 1e3 / ms1}
            row["multi_step_speedup"] = ms1 / ms
        rows.append(row)
        del engines
    return rows


def _run(engine, bm: BenchModel, opts: BenchOptions, sz: dict, single=None) -> dict:
    P, N = sz["prompt_len"], sz["new_tokens"]
    cfg = bm.config
    rng = random.Random(opts.seed)
    hf = bm.hf if opts.baseline else None
    ours_steps, hf_steps, bandwidths, single_steps = [], [], [], []
    ours_prefill, hf_prefill, agree = [], [], []
    _ours(engine, [rng.randrange(cfg.vocab_size) for _ in range(P)], 2, "warmup")
    if single is not None:
        _ours(single, [rng.randrange(cfg.vocab_size) for _ in range(P)], 2, "warmup-1")
    if hf is not None:
        from qwen35.benchmarks.hf_baseline import hf_generate

        hf_generate(hf, [[rng.randrange(cfg.vocab_size) for _ in range(P)]], 2)
    for r in range(sz["rounds"]):
        prompt = [rng.randrange(cfg.vocab_size) for _ in range(P)]
        steps, tokens = _ours(engine, prompt, N, f"decode-{r}")
        ours_prefill.append(steps[0])
        ours_steps += steps[1:]
        if single is not None:  # the same request, single steps
            one, one_tokens = _ours(single, prompt, N, f"decode-{r}-k1")
            single_steps += one[1:]
            if one_tokens != tokens:
                raise RuntimeError("multi-step decoding gave other tokens than single steps")
        if hf is not None:
            hf_tokens, times, _ = hf_generate(hf, [prompt], N)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            hf_prefill.append(gaps[0])
            hf_steps += gaps[1:]
            ref = hf_tokens[0].tolist()
            same = next(
                (i for i, (a, b) in enumerate(zip(tokens, ref, strict=False)) if a != b), len(ref)
            )
            agree.append(same)
        bandwidths.append(measure_read_bandwidth(sz["bw_mib"], device=bm.device))

    profile = None
    if bm.device.type == "cuda":  # kernels per token and the GPU-busy fraction
        from qwen35.benchmarks.gpu_profile import profile_decode

        profile = profile_decode(engine, [rng.randrange(cfg.vocab_size) for _ in range(P)])
    bw = median(bandwidths)
    context = P + N // 2  # the average context of the decode steps
    # tensor parallel: rank 0's shard; its GPU reads it alone, a CPU's ranks share one bus
    nbytes = decode_bytes_per_step(engine.model, context)
    if engine.workers is not None and bm.device.type == "cpu":
        nbytes = {k: v * engine.workers.size for k, v in nbytes.items()}
    roof = roofline_tokens_per_s(nbytes["total"], bw)
    ours_ms = median(ours_steps) * 1e3
    ours_tps = 1e3 / ours_ms
    hf_ms = median(hf_steps) * 1e3 if hf_steps else None
    hf_tps = 1e3 / hf_ms if hf_ms else None
    vs_hf = ratio(ours_tps, hf_tps)
    of_roof = ratio(ours_tps, roof)
    return {
        "tensor_parallel_size": 1 if engine.workers is None else engine.workers.size,
        "prompt_len": P,
        "new_tokens": N,
        "rounds": sz["rounds"],
        "read_bandwidth_gbps": bw / 1e9,
        "read_bandwidth_samples_gbps": [b / 1e9 for b in bandwidths],
        "bytes_per_step": nbytes,
        "roofline_tokens_per_s": roof,
        "ours": {
            "ms_per_token": ours_ms,
            "tokens_per_s": ours_tps,
            "prefill_s": median(ours_prefill),
            "num_steps_timed": len(ours_steps),
            "backend": engine.runner.backend.name,
            "cuda_graphs": engine.runner.graphs is not None,
            "num_scheduler_steps": opts.scheduler_steps,
            "gpu_profile": profile,
        },
        "transformers": None
        if hf is None
        else {
            "ms_per_token": hf_ms,
            "tokens_per_s": hf_tps,
            "prefill_s": median(hf_prefill),
            "num_steps_timed": len(hf_steps),
            # greedy tokens equal to ours before the first difference (near-ties on random
            # weights can flip an argmax in the last bits; information only)
            "greedy_tokens_agreeing": agree,
        },
        "single_step": None
        if single is None
        else {"ms_per_token": median(single_steps) * 1e3,
              "tokens_per_s": 1 / median(single_steps),
              "num_steps_timed": len(single_steps)},  # fmt: skip
        "multi_step_speedup": median(single_steps) * 1e3 / ours_ms if single is not None else None,
        "speedup_vs_transformers": vs_hf,
        "fraction_of_roofline": of_roof,
        "goals": [
            goal("decode_vs_transformers", vs_hf),
            goal("decode_of_roofline", of_roof),
        ],
    }
