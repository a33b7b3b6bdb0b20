"""Tensor parallelism in `qwen35 bench`: `-tp N` runs the decode workload's engine on N ranks, and
the `tp` workload compares one process with N ranks (default 2) on the same weights.

Ranks load their own shards from a checkpoint, so random weights are first written as one (the
one-process model's tensors in safetensors files of at most 1 GiB, and its config.json, in a
temporary directory removed at exit); a model directory with safetensors is read as it is.

`tp` workload: per round, each workload (batch-1 decode of one prompt; a batch of 8 mixed-length
prompts) runs on each engine in turn, interleaved; it reports the median generated tokens/s
(prefill included) and whether each engine emitted one process's tokens. On a CPU the ranks
share the cores (cores / N threads each), so one process is also timed on cores / N threads:
the fair comparison when the machine is loaded, where multi-threaded GEMMs wait at barriers.
With `--draft-tokens K` (a model with an MTP head) one process and N ranks also run with K
drafts a step, drafted by an oracle right 80% of the time (random weights' MTP head is almost
never right; benchmarks/speculative.py) from the tokens one process emitted in the same round.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from qwen35.benchmarks.common import BenchModel, BenchOptions, make_engine, median
from qwen35.benchmarks.speculative import batch_oracle
from qwen35.request import SamplingParams

FILE_BYTES = 1 << 30


def checkpoint_dir(bm: BenchModel, opts: BenchOptions) -> Path:
    """A directory the ranks can load bm's weights from (written once per BenchModel)."""
    if not bm.random_weights:
        return Path(opts.model).expanduser()
    cached = getattr(bm, "_tp_checkpoint", None)
    if cached is not None:
        return cached
    from safetensors.torch import save_file

    d = Path(tempfile.mkdtemp(prefix="qwen35-bench-tp-"))
    weakref.finalize(bm, shutil.rmtree, d, True)  # at exit at the latest
    (d / "config.json").write_text(json.dumps(_raw_config(opts.model), indent=2))
    files, part, size = {}, {}, 0
    for name, p in bm.model.named_parameters():  # a tied head once, as the embedding
        part[name] = p.detach().cpu().clone()  # packed projections share storage: copies
        size += p.numel() * p.element_size()
        if size >= FILE_BYTES:
            files[f"model-{len(files) + 1:05d}.safetensors"], part, size = part, {}, 0
    if part:
        files[f"model-{len(files) + 1:05d}.safetensors"] = part
    weight_map = {}
    for fname, tensors in files.items():
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    bm._tp_checkpoint = d
    return d


def _raw_config(model: str) -> dict:
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from qwen35.catalog import load_raw, resolve_name

    return load_raw(resolve_name(model))


def parallel_engine(bm: BenchModel, opts: BenchOptions, size: int, **kwargs):
    """An LLMEngine on `size` ranks over bm's weights (call .shutdown() when done)."""
    from qwen35.engine.llm_engine import LLMEngine

    return LLMEngine(
        str(checkpoint_dir(bm, opts)),
        tensor_parallel_size=size,
        enable_expert_parallel=opts.enable_expert_parallel,
        dtype=str(bm.dtype).removeprefix("torch."),
        device=str(bm.device),
        verbose=False,
        **kwargs,
    )


def generate(engine, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Generated tokens/s of greedy decoding `prompts` together, and the tokens."""
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rid = f"tp-{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        engine.add_request(f"{rid}-{i}", p, sp)
    out: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    wall = time.perf_counter() - t0
    return len(prompts) * tokens / wall, [out[f"{rid}-{i}"] for i in range(len(prompts))]


def run_tp(bm: BenchModel, opts: BenchOptions) -> dict:
    n = max(2, opts.tensor_parallel_size)
    rounds = opts.rounds or (1 if opts.quick else 3)
    tokens = 8 if opts.quick else 32
    V = bm.config.vocab_size
    rng = random.Random(opts.seed)
    workloads = {
        "decode batch 1": [[rng.randrange(V) for _ in range(16)]],
        "batch 8": [[rng.randrange(V) for _ in range(rng.randrange(8, 40 if opts.quick else 200))]
                    for _ in range(8)],
    }  # fmt: skip
    cores = torch.get_num_threads()
    per_rank = max(1, cores // n)
    kw = dict(max_num_seqs=8, max_model_len=256 + tokens)
    k = opts.draft_tokens[0] if opts.draft_tokens else 0
    one = make_engine(bm, **kw)
    opts.say(f"starting {n} ranks")
    # with drafts: one engine on N ranks (one process group a process), its drafts switched off
    # for the plain rows (runner.spec None: plain steps, the lookahead blocks unused)
    par = parallel_engine(bm, opts, n, **kw, **({"num_speculative_tokens": k} if k else {}))
    drafting = par.runner.spec
    engines = [("1 process", one, cores, None), (f"tp={n}", par, per_rank, None)]
    if bm.device.type == "cpu" and per_rank < cores:
        engines.insert(1, (f"1 process, {per_rank} thread(s)", one, per_rank, None))
    if k:  # speculative decoding on both (the oracle's drafts: set per run below)
        one_k = make_engine(bm, num_speculative_tokens=k, **kw)
        engines += [(f"1 process, k={k} oracle 80%", one_k, cores, one_k.runner.spec),
                    (f"tp={n}, k={k} oracle 80%", par, per_rank, drafting)]
    rates: dict[tuple[str, str], list[float]] = {}
    same: dict[tuple[str, str], bool] = {}
    try:
        for prompts in workloads.values():  # warm-up: first-step costs are not measured
            for _, eng, threads, spec in engines:
                torch.set_num_threads(threads)
                eng.runner.spec = spec
                generate(eng, prompts[:1], 2)
        for r in range(rounds):
            for wl, prompts in workloads.items():
                ref = None
                for name, eng, threads, spec in engines:
                    torch.set_num_threads(threads)  # both engines live in this process
                    eng.runner.spec = spec
                    if spec is not None:
                        spec.draft_override = batch_oracle(prompts, ref, 0.8, r)
                    rate, toks = generate(eng, prompts, tokens)
                    ref = toks if ref is None else ref
                    rates.setdefault((wl, name), []).append(rate)
                    same[(wl, name)] = same.get((wl, name), True) and toks == ref
            opts.say(f"tp round {r + 1}/{rounds}")
    finally:
        torch.set_num_threads(cores)
        par.shutdown()
    rows = [
        {"workload": wl, "engine": name, "threads": threads, "tokens_per_s": median(rates[(wl, name)]),
         "all": rates[(wl, name)], "same_tokens": same[(wl, name)]}
        for wl in workloads for name, _, threads, _ in engines
    ]  # fmt: skip
    return {
        "tensor_parallel_size": n,
        "expert_parallel": opts.enable_expert_parallel,
        "rounds": rounds,
        "new_tokens": tokens,
        "cores": cores,
        "threads_per_rank": per_rank,
        "draft_tokens": k,
        "rows": rows,
        "all_same_tokens": all(r["same_tokens"] for r in rows),
        "speedup_vs_1_process": {
            wl: median(rates[(wl, f"tp={n}")]) / median(rates[(wl, "1 process")])
            for wl in workloads
        },
    }
