"""Shared pieces of the benchmarks: options, the one model every workload uses, timing, system info.

The machines are shared and noisy, so every workload interleaves the runs it compares and
reports medians; absolute times are only meaningful next to the bandwidth measured in the run.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen35.devices import resolve_dtype, weights_label
from qwen35.errors import Qwen35Error
from qwen35.model_source import is_gguf_file


@dataclass
class BenchOptions:
    model: str = "Qwen3.5-0.8B"  # catalog name or config path (random weights), or a model dir
    dtype: str = "auto"  # auto: the engine's default (devices.py)
    device: str = "cpu"
    threads: int | None = None
    quick: bool = False  # small sizes: a fast check that everything runs
    baseline: bool = True  # also run transformers' generate
    seed: int = 0
    contexts: tuple[int, ...] | None = None  # long-context workload; None: the default set
    requests: int | None = None  # throughput workload; None: 32 (quick: 8)
    hf_batch_size: int = 8  # transformers' static batch size in the throughput workload
    rounds: int | None = None  # interleaved repetitions in the decode workload
    formats: tuple[str, ...] | None = None  # peers workload: weight formats (None: all)
    batches: tuple[int, ...] | None = None  # peers workload: batched decode sizes (None: none)
    draft_tokens: tuple[int, ...] | None = None  # spec workload: k of each drafting engine
    scheduler_steps: int = 1  # decode workload: our engine's num_scheduler_steps
    tensor_parallel_size: int = 1  # decode: our engine on this many ranks; tp: vs one process
    enable_expert_parallel: bool = False
    # serve workload (serving.py): prompt / output tokens, Poisson request rate, in-flight cap
    input_len: int | None = None
    output_len: int | None = None
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    progress: Callable[[str], None] | None = field(default=None, repr=False)  # long phases

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)


@dataclass
class BenchModel:
    """Our model (random weights unless --model is a checkpoint) and what the roofline needs."""

    model: torch.nn.Module
    source: str
    random_weights: bool
    dtype: torch.dtype
    device: torch.device
    weight_bytes: int = 0  # unique parameter bytes (a tied embedding counted once)
    num_params: int = 0
    hf: torch.nn.Module | None = field(default=None, repr=False)
    quantization: str | None = None  # weight storage: int8 / int4 / fp8, or bf16 (fp32 compute)
    needed_after: bool = True  # a later workload of the run uses the model (runner.run_bench)

    @property
    def label(self) -> str:
        """'bfloat16', 'float32', 'float32+bf16' (fp32 compute on bf16 weights), ..."""
        return weights_label(str(self.dtype).removeprefix("torch."), self.quantization)

    @property
    def config(self):
        return self.model.config


def load_bench_model(
    opts: BenchOptions, quantization: str | None = None, mtp: bool = False
) -> BenchModel:
    """A model directory with safetensors loads its weights; anything else (catalog name, config
    file, directory holding only config.json) gets seeded random weights. mtp: with the MTP
    head (speculative decoding)."""
    from qwen35.loader import auto_quantization, load_model, parse_dtype

    path = Path(opts.model).expanduser()
    real = (path.is_dir() and any(path.glob("*.safetensors"))) or is_gguf_file(path)
    dtype = resolve_dtype(opts.dtype, opts.device)
    try:
        if quantization is None:  # --dtype auto's weight storage, as the engine picks it
            fmt = "auto" if real else "random"
            quantization = auto_quantization(opts.model, fmt, opts.dtype, opts.device)
        model = load_model(
            opts.model,
            dtype=dtype,
            device=opts.device,
            load_format="auto" if real else "random",
            seed=opts.seed,
            progress=False,
            quantization=quantization,
            mtp=mtp,
        )
    except FileNotFoundError as e:
        raise Qwen35Error(f"--model {opts.model!r}: {e}") from None
    uniq = {p.data_ptr(): p for p in model.parameters()}.values()
    from qwen35.plan.params import mtp_tensors, text_tensors

    # parameters as the config counts them (a packed int4 / int6 tensor holds 2 / 1.33 a byte)
    tensors = text_tensors(model.config) + (mtp_tensors(model.config) if mtp else [])
    return BenchModel(
        model=model,
        source=opts.model,
        random_weights=not real,
        dtype=parse_dtype(dtype),
        device=torch.device(opts.device),
        weight_bytes=sum(p.numel() * p.element_size() for p in uniq),
        num_params=sum(math.prod(t.shape) * t.count for t in tensors),
        quantization=quantization,
    )


def request_steps(engine, prompt: list[int], new_tokens: int, rid: str, lora: str | None = None):
    """One greedy request run alone, an engine step at a time: yields each step's (seconds,
    the tokens it gave). lora: a loaded LoRA adapter's name."""
    from qwen35.request import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    if lora is None:
        engine.add_request(rid, prompt, sp)
    else:
        engine.add_request(rid, prompt, sp, lora=lora)
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        yield dt, [t for o in outs if o.outputs for t in o.outputs[0].token_ids]


def timed_request(engine, prompt: list[int], new_tokens: int, rid: str, lora: str | None = None):
    """One greedy request run alone: (prefill seconds, each later step's seconds, its tokens).
    Prefill is every step up to the one that gives the first token: several when the prompt
    is longer than one step's token budget (counting only the first step overstated prefill
    and put the other chunks among the decode steps). lora: a loaded LoRA adapter's name."""
    prefill, steps, tokens = 0.0, [], []
    for dt, new in request_steps(engine, prompt, new_tokens, rid, lora):
        if tokens:  # a multi-step round's k tokens count as k steps of dt / k
            steps += [dt / len(new)] * len(new) if new else [dt]
        else:
            prefill += dt
        tokens.extend(new)
    return prefill, steps, tokens


def prefill_ab(opts: BenchOptions, lengths: list[int], chunk: int, rounds: int, modes: dict,
               label: str) -> None:
    """Bench scripts' A/B of a prefill kernel against its fallback in one engine: whole prompts
    of each length, prefilled by a one-sequence engine of opts' model (steps of `chunk` tokens)
    under each of the two modes {name: fn() that switches the engine to it}, in turn each round,
    the order reversed every other round. Prints tokens/s of each mode and the first's time over
    the second's (the median, and per round); leaves the last mode switched on."""
    bm = load_bench_model(opts)
    eng = make_engine(bm, max_num_seqs=1, max_model_len=max(lengths) + 8,
                      max_num_batched_tokens=chunk, enable_prefix_caching=False)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    timed_request(eng, list(range(2, 66)), 1, "warm")
    names = list(modes)
    a, b = names
    for n in lengths:
        prompt = torch.randint(2, 150000, (n,), generator=g).tolist()
        t: dict[str, list[float]] = {m: [] for m in names}
        for r in range(rounds):
            for m in names if r % 2 == 0 else names[::-1]:
                modes[m]()
                t[m].append(timed_request(eng, prompt, 1, f"{n}-{r}-{m}")[0])
        modes[b]()
        med = {m: statistics.median(v) for m, v in t.items()}
        per_round = ", ".join(f"{x / y:.2f}" for x, y in zip(t[a], t[b], strict=True))
        print(f"{label} prefill of {n} tokens ({chunk} a step): {a} {n / med[a]:7.1f} tok/s, {b} "
              f"{n / med[b]:7.1f} tok/s: {med[a] / med[b]:.2f}x (per round {per_round})",
              flush=True)  # fmt: skip


def timed_batch(engine, prompts: list[list[int]], steps: int, tag: str) -> list[float]:
    """The prompts added at once as greedy requests (ignore_eos): the seconds of each of the
    first `steps` engine steps after every prompt has its first token (each step decodes them
    all, none has finished yet); the requests are then aborted. The engine must hold
    len(prompts) sequences of len(prompt) + `steps` + the prefill steps' tokens. A multi-step
    round (num_scheduler_steps) that gives each sequence k tokens counts as k steps of dt / k."""
    from qwen35.request import SamplingParams

    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    longest = max(len(p) for p in prompts)
    sp = SamplingParams(
        max_tokens=engine.max_model_len - longest, temperature=0.0, ignore_eos=True
    )
    for rid, p in zip(rids, prompts, strict=True):
        engine.add_request(rid, p, sp)
    started, times = set(), []
    try:
        while len(times) < steps:
            all_started = len(started) == len(rids)
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if all_started:
                if len(outs) != len(rids) or any(o.finished for o in outs):
                    raise RuntimeError(f"{tag}: a batched step decoded {len(outs)} of {len(rids)}")
                k = max(1, len(outs[0].outputs[0].token_ids))
                times += [dt / k] * k
            started.update(o.request_id for o in outs if o.outputs and o.outputs[0].token_ids)
    finally:
        for rid in rids:
            engine.abort_request(rid)
    return times


def make_engine(bm: BenchModel, **kwargs):
    """An LLMEngine over the already-loaded model (engines share one set of weights)."""
    from qwen35.engine.llm_engine import LLMEngine

    return LLMEngine(bm.model, device=str(bm.device), verbose=False, **kwargs)


def free_memory() -> None:
    """Collect what is unreferenced and hand freed heap memory back (qwen35/heap.py)."""
    from qwen35 import heap

    gc.collect()
    heap.release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or not b or a != a or b != b:
        return None
    return a / b


# The project's targets (stated in the README's benchmark section). The JSON document records
# each next to its measurement so runs can be tracked; the terminal tables do not print them.
GOALS = {
    "decode_vs_transformers": ("batch-1 decode >= 1.5x transformers", 1.5),
    "decode_of_roofline": ("batch-1 decode >= 60% of the bandwidth roofline", 0.6),
    "throughput_vs_transformers": ("32-request total tokens/s >= 3x transformers", 3.0),
}


def goal(key: str, measured: float | None) -> dict:
    name, target = GOALS[key]
    return {
        "name": name,
        "target": target,
        "measured": measured,
        "met": None if measured is None else measured >= target,
    }


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn()."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_seconds(fn, reps: int) -> float:
    """Median wall seconds of fn() over `reps` calls after one warm-up call (CPU benchmarks)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with its family / model numbers where /proc/cpuinfo has them: VMs
    often name every AMD EPYC alike, and Zen 4 (family 25) and Zen 5 (26) have measured opposite
    winners between kernel paths (README: Decode GEMVs)."""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return cpu


def system_info(opts: BenchOptions) -> dict:
    cpu = cpu_description()
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": opts.device,
        "load_average": _loadavg(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if opts.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(opts.device))
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def kernel_sources_at(rev: str, folder: str | Path) -> Path:
    """Write git revision `rev`'s CPU kernel sources and headers (src/qwen35/kernels/*.cpp, *.h)
    into `folder`, for `Native.from_folder` (bench/gemv.py, bench/attention_cpu.py --baseline:
    a kernel as of a commit, built beside this checkout's)."""
    kdir, folder = "src/qwen35/kernels", Path(folder)
    root = Path(__file__).resolve().parents[3]
    files = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", f"{rev}:{kdir}"],
                           check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    for f in files:
        if f.endswith((".cpp", ".h")):
            blob = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{kdir}/{f}"], check=True,
                                  capture_output=True).stdout  # fmt: skip
            (folder / f).write_bytes(blob)
    return folder


def alternate_with_revision(
    rev: str, rounds: int, argv: list[str], width: int
) -> dict[str, list[list[float]]]:
    """Run `python argv` `rounds` times from this checkout's src ("new") and from git revision
    `rev` checked out into a temporary worktree ("base"), alternating which goes first; each
    run prints `width` numbers on its last line. -> {"new": [[...] per round], "base": ...}
    (bench/decode_ab.py, bench/host_overhead.py: a change measured in whole processes)."""
    import os
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[3]
    times: dict[str, list[list[float]]] = {"new": [], "base": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(base),
                        rev], check=True)  # fmt: skip
        try:
            trees = {"new": root / "src", "base": base / "src"}
            for r in range(rounds):
                for name in (("new", "base") if r % 2 == 0 else ("base", "new")):
                    env = {**os.environ, "PYTHONPATH": str(trees[name])}
                    res = subprocess.run([sys.executable, *argv], env=env, capture_output=True,
                                         text=True)  # fmt: skip
                    if res.returncode != 0:
                        sys.exit(f"the {name} process failed:\n{res.stderr[-3000:]}")
                    times[name].append([float(v) for v in res.stdout.split()[-width:]])
                    print(f"round {r + 1} {name}: " + " ".join(f"{v:.3f}" for v in times[name][-1]),
                          flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    return times
