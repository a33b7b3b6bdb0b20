"""Runs the chosen workloads in one process on one model and assembles the JSON document.

Document (schema "qwen35.bench/1"):
  {"schema", "model", "random_weights", "dtype", "num_params", "weight_bytes", "quick",
   "baseline", "baseline_implementation", "system": {...}, "workloads": {"decode": {...}, "throughput": {...},
   "long_context": {...}, "multi_turn": {...}, "dtype": {...}}, "goals": [{"name", "target", "measured",
   "met"}], "seconds": {workload: wall seconds}}
Only the workloads that ran appear under "workloads".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qwen35.benchmarks import PARALLEL, SCHEMA, WORKLOADS
from qwen35.benchmarks.common import BenchOptions, free_memory, load_bench_model, system_info


def _workload_fns() -> dict[str, Callable]:
    from qwen35.benchmarks.decode import run_decode
    from qwen35.benchmarks.dtype import run_dtype
    from qwen35.benchmarks.long_context import run_long_context
    from qwen35.benchmarks.multi_turn import run_multi_turn
    from qwen35.benchmarks.parallel import run_tp
    from qwen35.benchmarks.peers import run_peers
    from qwen35.benchmarks.quality import run_quality
    from qwen35.benchmarks.serving import run_serve
    from qwen35.benchmarks.speculative import run_speculative
    from qwen35.benchmarks.structured import run_structured
    from qwen35.benchmarks.throughput import run_throughput
    from qwen35.benchmarks.vision import run_vision

    return {
        "decode": run_decode,
        "throughput": run_throughput,
        "long-context": run_long_context,
        "multi-turn": run_multi_turn,
        "dtype": run_dtype,
        "structured": run_structured,
        "vision": run_vision,
        "quality": run_quality,
        "peers": run_peers,
        "tp": run_tp,
        "spec": run_speculative,
        "serve": run_serve,
    }


NEEDS_BASELINE = ("decode", "throughput")


def run_bench(
    opts: BenchOptions,
    workloads: list[str],
    progress: Callable[[str], None] | None = None,
    on_workload: Callable[[dict, str], None] | None = None,
) -> dict:
    """Run `workloads` in order; `on_workload(doc, key)` after each (the document so far and
    the key of the workload just added), so long runs can print and save as they go."""
    say = progress or (lambda msg: None)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {WORKLOADS}")
    others = [w for w in workloads if w not in PARALLEL]
    if opts.tensor_parallel_size > 1 and others:
        from qwen35.errors import Qwen35Error

        raise Qwen35Error(
            f"--tensor-parallel-size {opts.tensor_parallel_size} applies to the workloads "
            f"{', '.join(PARALLEL)}, not {', '.join(others)}: choose one with --workload"
        )
    from qwen35.engine.runtime import configure_cpu_runtime

    runtime = configure_cpu_runtime(opts.threads)  # what every engine does at start
    say(f"loading {opts.model} ({opts.dtype})")
    t0 = time.perf_counter()
    # the MTP head: spec drafts with it, tp with --draft-tokens
    mtp = "spec" in workloads or ("tp" in workloads and bool(opts.draft_tokens))
    bm = load_bench_model(opts, mtp=mtp)
    doc = {
        "schema": SCHEMA,
        "model": bm.config.name,
        "source": opts.model,
        "random_weights": bm.random_weights,
        "dtype": str(bm.dtype).removeprefix("torch."),  # compute
        "weights": bm.label,  # and storage: "float32+bf16" is fp32 compute on bf16 weights
        "num_params": bm.num_params,
        "weight_bytes": bm.weight_bytes,
        "quick": opts.quick,
        "baseline": opts.baseline,
        "baseline_implementation": None,  # transformers' Gated DeltaNet path (hf_baseline.py)
        "seed": opts.seed,
        "system": system_info(opts),
        "workloads": {},
        "goals": [],
        "seconds": {"load": time.perf_counter() - t0},
    }
    doc["system"]["freed_memory_kept_in_heap"] = runtime["freed_memory_kept_in_heap"]
    if opts.baseline and any(w in NEEDS_BASELINE for w in workloads):
        from qwen35.benchmarks.hf_baseline import build_hf_model, implementation

        bm.hf = build_hf_model(bm.model)
        doc["baseline_implementation"] = implementation(bm.device)
    fns = _workload_fns()
    for i, w in enumerate(workloads):
        say(f"running {w}")
        bm.needed_after = i < len(workloads) - 1  # (peers may free it and need not reload it)
        t = time.perf_counter()
        result = fns[w](bm, opts)
        doc["seconds"][w] = time.perf_counter() - t
        doc["workloads"][w.replace("-", "_")] = result
        doc["goals"] += result.get("goals", [])
        free_memory()
        if on_workload is not None:
            on_workload(doc, w.replace("-", "_"))
    doc["system"]["load_average_end"] = system_info(opts)["load_average"]
    return doc
