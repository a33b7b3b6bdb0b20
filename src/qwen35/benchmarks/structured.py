"""Structured outputs: the per-step cost of constraining every row, and schema compile time.

- Decode at batch B (32): B greedy requests decoded together, unconstrained vs every row under a
  JSON schema (a list of at least 8 tool-call-like objects, so no row's grammar ends inside the
  timed steps), on the same engine and weights, rounds interleaved (U, C, U, C, ...). A step's
  time is the wall time of `LLMEngine.step()`; the overhead is the median constrained step over
  the median unconstrained one, minus 1. The mask's own share (llguidance fill + EOS fix-up +
  unpack and masked_fill on the logits) is timed inside the same steps.
- Compile: the llguidance vocabulary build (once per process), then distinct typical tool
  schemas compiled one after another (cache misses), and a cache hit.
"""

from __future__ import annotations

import random
import time

from qwen35.benchmarks.common import BenchModel, BenchOptions, make_engine, median
from qwen35.request import SamplingParams, StructuredOutputs


def tool_schema(i: int) -> dict:
    """A typical tool's parameters (a weather / search style call); `i` makes it distinct."""
    return {
        "type": "object",
        "properties": {
            f"city_{i}": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "hourly": {"type": "boolean"},
            "fields": {"type": "array", "items": {"type": "string", "maxLength": 12},
                       "maxItems": 4},
        },
        "required": [f"city_{i}", "unit"],
        "additionalProperties": False,
    }  # fmt: skip


STEADY = {"type": "array", "items": tool_schema(0), "minItems": 8}


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"batch": 4, "prompt_len": 16, "new_tokens": 4, "rounds": opts.rounds or 1,
                "schemas": 3}  # fmt: skip
    return {"batch": 32, "prompt_len": 64, "new_tokens": 16, "rounds": opts.rounds or 3,
            "schemas": 10}  # fmt: skip


def _round(engine, prompts, new_tokens: int, spec, tag: str, mask_s: list[float]) -> list[float]:
    """Decode-step seconds of one batch, all rows decoding; `mask_s` keeps the mask times of
    exactly those steps."""
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            structured_outputs=spec)  # fmt: skip
        engine.add_request(f"{tag}-{i}", p, sp)
    steps: list[float] = []
    first = True
    while engine.has_unfinished_requests():
        before = len(mask_s)
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        sched = engine.scheduler
        decoding = sched.num_running == len(prompts) and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in sched.running
        )
        if decoding and not first:
            steps.append(dt)
        else:  # prefill steps, and the first decoding one (it may carry the last chunk)
            del mask_s[before:]
        first = first and not decoding
    return steps


def run_structured(bm: BenchModel, opts: BenchOptions) -> dict:
    sz = sizes(opts)
    B, P, N = sz["batch"], sz["prompt_len"], sz["new_tokens"]
    rng = random.Random(opts.seed)
    engine = make_engine(bm, max_num_seqs=B, max_model_len=P + N + 16,
                         enable_prefix_caching=False)  # fmt: skip
    mgr = engine.structured

    # compile times: the vocabulary once, then distinct schemas (cache misses), then a hit
    t0 = time.perf_counter()
    mgr.compiler.ll_tokenizer_future().result()
    vocab_s = time.perf_counter() - t0
    compile_ms = []
    for i in range(1, sz["schemas"] + 1):
        t0 = time.perf_counter()
        mgr.compile(StructuredOutputs(json=tool_schema(i)))
        compile_ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    mgr.compile(StructuredOutputs(json=tool_schema(1)))
    hit_ms = (time.perf_counter() - t0) * 1e3

    # the mask's share, timed inside the constrained steps
    mask_s: list[float] = []
    apply = mgr.apply

    def timed_apply(logits, seqs, drafted=None, **kw):
        t = time.perf_counter()
        out = apply(logits, seqs, drafted, **kw)
        if mgr.num_active:
            mask_s.append(time.perf_counter() - t)
        return out  # (the rows the grammar leaves no token)

    engine.runner.logits_processor = timed_apply
    spec = StructuredOutputs(json=STEADY)
    mgr.compile(spec)
    free, constrained = [], []
    for r in range(sz["rounds"] + 1):  # round 0 warms both paths up
        prompts = [[rng.randrange(bm.config.vocab_size) for _ in range(P)] for _ in range(B)]
        if opts.progress:
            opts.progress(f"structured round {r}/{sz['rounds']}")
        u = _round(engine, prompts, N, None, f"u{r}", mask_s)
        c = _round(engine, prompts, N, spec, f"c{r}", mask_s)
        if r == 0:
            del mask_s[:]
            continue
        free += u
        constrained += c
    free_ms, con_ms = median(free) * 1e3, median(constrained) * 1e3
    overhead = con_ms / free_ms - 1.0
    compile_med = median(compile_ms)
    return {
        "batch": B,
        "prompt_len": P,
        "new_tokens": N,
        "rounds": sz["rounds"],
        "step_ms_unconstrained": free_ms,
        "step_ms_constrained": con_ms,
        "overhead": overhead,
        "mask_ms_per_step": median(mask_s) * 1e3 if mask_s else None,
        "num_steps_timed": [len(free), len(constrained)],
        "vocab_build_s": vocab_s,
        "compile_ms": compile_ms,
        "compile_ms_median": compile_med,
        "compile_ms_cache_hit": hit_ms,
        "goals": [
            {"name": f"constrained decode step overhead at batch {B} <= 10%",
             "target": 0.10, "measured": overhead, "met": overhead <= 0.10},
            {"name": "tool-schema compile after the vocabulary <= 50 ms (median)",
             "target": 50.0, "measured": compile_med, "met": compile_med <= 50.0},
        ],
    }  # fmt: skip
