"""Our engine at each weight format vs llama.cpp at the matching precision, one run, interleaved.

Ours: fp32, bf16, int8, int4 and fp8 weights (the same seeded random weights, quantized at load).
llama.cpp (optional, through `llama-cpp-python`; skipped with the reason when it is not
installed): the same weights saved as a transformers checkpoint and converted by llama.cpp's own
`convert_hf_to_gguf.py` to f32 / bf16 / q8_0 / q4_0 (`benchmarks/gguf.py`). Pairs: fp32-f32,
bf16-bf16, int8-q8_0, int4-q4_0 (fp8 has no llama.cpp twin; its goal is int8's speed / 1.3).
Measured per engine and round (rounds interleave all engines; where they would not fit in memory
together, one format and its twin at a time: `engine_groups`): batch-1 decode tokens/s (median
step after a 128-token prompt; our format and its llama.cpp twin alternate step by step) and
prefill tokens/s at 512 and 2048 tokens; with `--batches`, batched decode: B sequences of
128-token prompts decoding together, total tokens/s (ours: one engine step a token of each;
llama.cpp: one `llama_decode` of B tokens in a context of B sequences, as llama-server's
parallel slots).
"""

from __future__ import annotations

import dataclasses
import random

from qwen35.benchmarks.common import (
    BenchModel,
    BenchOptions,
    free_memory,
    make_engine,
    median,
    ratio,
    request_steps,
    timed_batch,
    timed_request,
)
from qwen35.devices import resolve_dtype
from qwen35.heap import available_memory

OURS = ("fp32", "bf16", "int8", "int4", "fp8")
PAIRS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def goal(name: str, measured: float | None, target: float) -> dict:
    """A goal row of the bench document (names depend on which formats ran)."""
    met = None if measured is None else measured >= target
    return {"name": name, "target": target, "measured": measured, "met": met}


def sizes(opts: BenchOptions) -> dict:
    """--contexts overrides the prefill lengths."""
    if opts.quick:
        sz = {"prompt": 16, "new": 6, "prefill": (32,), "rounds": opts.rounds or 1, "long_new": 3}
    else:
        sz = {"prompt": 128, "new": 32, "prefill": (512, 2048), "rounds": opts.rounds or 3}
        sz["long_new"] = 12  # decode steps timed after the longest prefill
    sz["batches"] = tuple(opts.batches or ())  # batched decode: sequences decoding together
    sz["batch_steps"] = 4 if opts.quick else 12  # timed steps of each batched run
    return {**sz, "prefill": tuple(opts.contexts or sz["prefill"])}


def format_options(fmt: str, opts: BenchOptions) -> tuple[str, str | None]:
    """(compute dtype, weight quantization) of our weight format `fmt`: fp32 is fp32 throughout;
    the others compute in what `--dtype` gives here (auto: bf16 on CPUs with native bf16, fp32
    on the others, e.g. AMD Zen 3, where torch's bf16 GEMMs are a slow single-threaded
    fallback) on weights stored as `fmt` (bf16 storage with fp32 compute is `quantization bf16`)."""
    if fmt == "fp32":
        return "fp32", None
    compute = resolve_dtype(opts.dtype, opts.device)
    if fmt == "bf16":
        return compute, "bf16" if compute == "fp32" else None
    return compute, fmt


def is_bench_format(bm: BenchModel, fmt: str, opts: BenchOptions) -> bool:
    """Whether our format `fmt` is the bench model itself (its compute dtype and storage)."""
    from qwen35.loader import parse_dtype

    dtype, quantization = format_options(fmt, opts)
    return parse_dtype(dtype) == bm.dtype and quantization == bm.quantization


def _load_ours(bm: BenchModel, opts: BenchOptions, fmt: str):
    from qwen35.benchmarks.common import load_bench_model

    if is_bench_format(bm, fmt, opts):
        return bm
    dtype, quantization = format_options(fmt, opts)
    return load_bench_model(dataclasses.replace(opts, dtype=dtype), quantization=quantization)


class _Ours:
    def __init__(self, bm: BenchModel, max_len: int, max_seqs: int = 1):
        self.bm = bm
        self.engine = make_engine(
            bm, max_num_seqs=max_seqs, max_model_len=max_len, enable_prefix_caching=False
        )
        self.kv_cache = str(self.engine.runner.caches.key[0].dtype).removeprefix("torch.")

    def run(self, prompt: list[int], new: int, rid: str) -> tuple[float, list[float]]:
        prefill, steps, _ = timed_request(self.engine, prompt, new, rid)
        return prefill, steps

    def steps(self, prompt: list[int], new: int, rid: str):
        """The request's decode steps one at a time (prefill untimed): yields each one's
        seconds, `new` - 1 of them (timed_request's, so that a pair can alternate step by
        step)."""
        run = request_steps(self.engine, prompt, new, rid)
        for _, tokens in run:  # prefill: every step up to the one that gives the first token
            if tokens:
                break
        for dt, _ in run:
            yield dt

    def run_batch(self, prompts: list[list[int]], steps: int, rid: str) -> list[float]:
        return timed_batch(self.engine, prompts, steps, rid)

    def close(self) -> None:
        """Drop the engine and model (their memory goes with the last reference)."""
        self.engine.shutdown()
        self.engine = self.bm = None


def _decode_pairs(engines: dict, r: int) -> list[list[str]]:
    """Round r's pairs: each of our formats with its llama.cpp twin (alone where none is
    loaded), which goes first alternating with the round."""
    pairs = []
    for name in engines:
        if name.startswith("llama.cpp "):
            continue  # placed beside its twin
        twin = f"llama.cpp {PAIRS.get(name.removeprefix('qwen35 '), '')}"
        pair = [name, twin] if twin in engines else [name]
        pairs.append(pair if r % 2 == 0 else pair[::-1])
    return pairs


def _decode_order(engines: dict, r: int) -> list[str]:
    """Round r's order of runs: the pairs of `_decode_pairs` back to back."""
    return [name for pair in _decode_pairs(engines, r) for name in pair]


def interleaved_steps(runs: list) -> list[list[float]]:
    """Step generators (each yields its decode steps' seconds) advanced alternately, one step
    each, the first to step swapping every step, so that every engine's steps sample the same
    seconds of the machine (whose memory bandwidth drifts 1.5x between minutes on a shared VM):
    each one's list of seconds, in order; a run that ends early stops taking turns."""
    times: list[list[float]] = [[] for _ in runs]
    live = list(range(len(runs)))
    turn = 0
    while live:
        for i in list(live) if turn % 2 == 0 else live[::-1]:
            t = next(runs[i], None)
            if t is None:
                live.remove(i)
            else:
                times[i].append(t)
        turn += 1
    return times


def run_peers(bm: BenchModel, opts: BenchOptions) -> dict:
    from qwen35.benchmarks import gguf

    try:
        return _run_peers(bm, opts, gguf)
    finally:
        gguf.cleanup()  # the converted weights: GBs in the temp dir


def check_formats(formats: tuple[str, ...] | None) -> tuple[str, ...]:
    """--formats as the peers workload runs it (default: all of OURS), or a Qwen35Error saying
    what it takes (`qwen35 bench` checks it before loading any model)."""
    formats = formats or OURS
    bad = [f for f in formats if f not in OURS]
    if bad or "bf16" not in formats:
        from qwen35.errors import Qwen35Error

        raise Qwen35Error(f"--formats takes bf16 and any of {', '.join(OURS)}; got "
                          f"{','.join(formats)}")  # fmt: skip
    return formats


def _load_engine(name: str, bm: BenchModel, opts: BenchOptions, paths: dict, max_len: int,
                 sz: dict, gguf) -> tuple[object, dict]:  # fmt: skip
    """One engine of the workload and its row's facts (weight bytes, weights label, K/V dtype),
    which outlive it."""
    if name.startswith("qwen35 "):
        fmt = name.removeprefix("qwen35 ")
        opts.say(f"peers: loading ours {fmt}")
        m = _load_ours(bm, opts, fmt)
        ours = _Ours(m, max_len, max(sz["batches"], default=1))
        head = ours.engine.head_screen  # the int8 screen of lm_head (models/head_screen.py)
        facts = {"weight_bytes": m.weight_bytes + (head.nbytes if head else 0),
                 "weights": m.label, "kv_cache": ours.kv_cache}  # fmt: skip
        return ours, facts
    q = name.removeprefix("llama.cpp ")
    facts = {"weight_bytes": paths[q].stat().st_size, "weights": q, "kv_cache": "float16"}
    return gguf.LlamaRunner(paths[q], max_len, opts.threads), facts


def our_bytes(bm: BenchModel, fmt: str, opts: BenchOptions) -> int:
    """What loading our format `fmt` adds to memory: 0 where it is the bench model itself, else
    the planner's weight bytes of its storage (plan/params.py, the loader's formulas), plus an
    int8 copy of lm_head (the head screen) and 10% for caches and the engine's buffers."""
    from qwen35.loader import parse_dtype
    from qwen35.plan.params import weight_bytes

    if is_bench_format(bm, fmt, opts):
        return 0
    dtype, quantization = format_options(fmt, opts)
    cfg = bm.config
    n = weight_bytes(cfg, quantization or "bf16", text_only=True)
    if quantization is None and parse_dtype(dtype).itemsize == 4:
        n *= 2  # fp32 weights
    return int(1.1 * (n + cfg.vocab_size * cfg.hidden_size))


def engine_groups(bm: BenchModel, formats: tuple[str, ...], paths: dict, opts: BenchOptions,
                  available: int | None = None) -> tuple[list[list[str]], dict[str, str], int | None]:  # fmt: skip
    """Which engines run together: ([engine names measured together], {engine: why not run},
    the group before which the bench model is let go, or None). All of them in one group
    (rounds interleave every engine) when their memory fits what the machine has available now
    (MemAvailable; unknown: assumed to fit); else one group a format, ours and its llama.cpp
    twin (GGUF file size: llama.cpp maps it whole), each freed before the next loads, the bench
    model's own format first: a later pair that fits only without the bench model's weights
    (a 9B's 18 GB of bf16 on a 24 GiB machine) gets them freed before it runs (`_release`,
    reloaded at the end); a pair that still does not fit runs ours alone, a format whose own
    weights do not fit is skipped. Without this a 4B's five engines (~30 GB) were killed by
    the OOM killer on a 24 GiB machine, with nothing said."""
    if available is None:
        available = available_memory()
    need = {f"qwen35 {f}": our_bytes(bm, f, opts) for f in formats}
    need |= {f"llama.cpp {q}": p.stat().st_size for q, p in paths.items()}
    own = {f"qwen35 {f}" for f in formats if is_bench_format(bm, f, opts)}
    pairs = []
    for f in formats:
        twin = f"llama.cpp {PAIRS.get(f, '')}"
        pairs.append([f"qwen35 {f}"] + ([twin] if twin in need else []))
    if available is None or sum(need.values()) <= available:
        return [[n for pair in pairs for n in pair]], {}, None
    pairs.sort(key=lambda pair: pair[0] not in own)  # (stable: the formats' order otherwise)
    first = 1 if pairs[0][0] in own else 0  # the first group that runs without the bench model
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    groups, skipped, release_at = [], {}, None
    for i, pair in enumerate(pairs):
        room = available + (bm.weight_bytes if i >= first else 0)
        while pair and sum(need[n] for n in pair) > room:
            gone = pair.pop()  # the twin first, then ours
            skipped[gone] = (f"needs {gib(sum(need[n] for n in pair + [gone]))} with "
                             f"{'its pair' if pair else 'nothing else loaded'}, "
                             f"{gib(room)} available")  # fmt: skip
        if pair and sum(need[n] for n in pair) > available and release_at is None:
            release_at = len(groups)
        if pair:
            groups.append(pair)
    return groups, skipped, release_at


def _release(bm: BenchModel) -> None:
    """The bench model's weights freed (its config kept): a later pair, or llama.cpp's
    converter, needs the memory. Nothing where they are freed already."""
    if not isinstance(bm.model, _Released):
        bm.model = _Released(bm.model.config, getattr(bm.model, "mtp", None) is not None)
        free_memory()


def converter_bytes(bm: BenchModel) -> int:
    """What llama.cpp's converter may hold at once (it widens a tensor to fp32 and writes a
    converted copy): twice the largest tensor in fp32, plus 1 GiB for itself."""
    largest = max(p.numel() for p in bm.model.parameters())
    return 2 * 4 * largest + (1 << 30)


def _uses_bench_model(bm: BenchModel, group: list[str], opts: BenchOptions) -> bool:
    return any(n.startswith("qwen35 ") and is_bench_format(bm, n.removeprefix("qwen35 "), opts)
               for n in group)  # fmt: skip


class _Released:
    """What stays of a released bench model until `_restore` loads it again."""

    def __init__(self, config, mtp: bool):
        self.config, self.mtp = config, mtp


def _restore(bm: BenchModel, opts: BenchOptions) -> None:
    """The released bench model loaded again as the bench loaded it (seeded random weights
    are drawn the same), for whatever runs after this workload."""
    from qwen35.benchmarks.common import load_bench_model

    if isinstance(bm.model, _Released):
        bm.model = load_bench_model(opts, quantization=bm.quantization, mtp=bm.model.mtp).model


class _Results:
    """Each engine's timings, gathered over the groups of engines it ran in."""

    def __init__(self, sz: dict, vocab_size: int):
        self.sz, self.V = sz, vocab_size
        self.decode: dict[str, list] = {}
        self.per_round: dict[str, list] = {}  # each round's median step: paired ratios show noise
        self.prefill: dict[str, dict] = {}
        self.batched: dict[str, dict] = {}  # each round's total tok/s by batch size
        self.decode_long: dict[str, list] = {}  # steps after the longest prefill
        self.long_round: dict[str, list] = {}  # and each round's median of them

    def measure(self, engines: dict, rng: random.Random, opts: BenchOptions) -> None:
        """sz's rounds over these engines, interleaved (pairs back to back, alternating)."""
        sz = self.sz
        big = max(sz["prefill"])
        V = self.V
        for name in engines:
            self.decode[name], self.per_round[name] = [], []
            self.prefill[name] = {p: [] for p in sz["prefill"]}
            self.batched[name] = {b: [] for b in sz["batches"]}
            self.decode_long[name], self.long_round[name] = [], []
        for name, eng in engines.items():  # warm-up
            eng.run([rng.randrange(V) for _ in range(8)], 2, f"warm-{name}")
        for r in range(sz["rounds"]):
            opts.say(f"peers: round {r + 1}/{sz['rounds']}")
            prompt = [rng.randrange(V) for _ in range(sz["prompt"])]
            long = {p: [rng.randrange(V) for _ in range(p)] for p in sz["prefill"]}
            # decode: each pair back to back (ours first in even rounds, llama.cpp first in odd
            # ones), so a pair's ratio sees the same minute of the machine's bandwidth, which drifts
            for pair in _decode_pairs(engines, r):  # a pair's steps alternate one by one
                for name, steps in zip(pair, interleaved_steps(
                    [engines[n].steps(prompt, sz["new"], f"{n}-d{r}") for n in pair]), strict=True):  # fmt: skip
                    self.decode[name] += steps
                    self.per_round[name].append(1 / median(steps))
            for b in sz["batches"]:  # B sequences decoding together, pairs back to back as above
                prompts = [[rng.randrange(V) for _ in range(sz["prompt"])] for _ in range(b)]
                for name in _decode_order(engines, r):
                    steps = engines[name].run_batch(prompts, sz["batch_steps"], f"{name}-b{b}-{r}")
                    self.batched[name][b].append(b / median(steps))
            for name in _decode_order(engines, r):  # prefills (and decode after the longest)
                eng = engines[name]
                for p, toks in long.items():
                    new = 1 + (sz["long_new"] if p == big else 0)
                    first, steps = eng.run(toks, new, f"{name}-p{p}-{r}")
                    self.prefill[name][p].append(first)
                    if p == big:
                        self.decode_long[name] += steps
                        self.long_round[name].append(1 / median(steps))


def _run_peers(bm: BenchModel, opts: BenchOptions, gguf) -> dict:
    sz = sizes(opts)
    big = max(sz["prefill"])
    max_len = big + max(sz["new"], sz["long_new"]) + 16
    formats = check_formats(opts.formats)
    llama = gguf.available()
    paths = {}  # llama.cpp twin -> its GGUF file, all converted before any engine of ours loads
    quants = [PAIRS[f] for f in formats if f in PAIRS]
    if llama is None:
        for d in gguf.remove_stale():
            opts.say(f"peers: removed {d}, the converted weights of a run that was killed")
        try:
            gguf.check_disk(bm.num_params, quants)
        except gguf.GGUFError as e:
            llama = f"llama.cpp: {e}"
    if llama is None:
        opts.say("peers: converting the weights to GGUF with llama.cpp's converter")
        gguf.checkpoint(bm)  # what the converter reads, written while the weights are here
        room = available_memory()
        if room is not None and room < converter_bytes(bm):
            opts.say("peers: the bench model's weights freed while llama.cpp converts (memory)")
            _release(bm)
        for q in quants:
            try:
                paths[q] = gguf.convert(bm, q, opts)
            except gguf.GGUFError as e:
                llama, paths = f"llama.cpp {q}: {e}", {}
                break
    room = available_memory()  # (as if the bench model were loaded)
    if room is not None and isinstance(bm.model, _Released):
        room -= bm.weight_bytes
    groups, skipped, release_at = engine_groups(bm, formats, paths, opts, available=room)
    info: dict[str, dict] = {}  # each engine's row facts, kept after it is freed
    acc = _Results(sz, bm.config.vocab_size)
    rng = random.Random(opts.seed)
    try:
        for i, group in enumerate(groups):
            if _uses_bench_model(bm, group, opts):
                _restore(bm, opts)  # (freed while llama.cpp converted)
            elif release_at is not None and i >= release_at and not isinstance(bm.model, _Released):
                opts.say("peers: the bench model's weights freed for the next pairs (memory)")
                _release(bm)
            if len(groups) > 1:
                opts.say(f"peers: {' and '.join(group)} (one pair at a time: memory)")
            engines: dict[str, object] = {}
            for name in group:
                engines[name], info[name] = _load_engine(name, bm, opts, paths, max_len, sz, gguf)
            acc.measure(engines, rng, opts)
            for eng in engines.values():  # the next pair's memory (bm: see _release)
                eng.close()
            del engines
            free_memory()
    finally:  # also when a pair failed; not where no later workload of the run needs it
        if bm.needed_after:
            _restore(bm, opts)
    rows = {}
    decode, per_round, prefill = acc.decode, acc.per_round, acc.prefill
    decode_long, long_round, batched = acc.decode_long, acc.long_round, acc.batched
    for name in info:
        d = median(decode[name])
        rows[name] = {
            # weights: the format's label; kv_cache: the K/V cache's dtype (ours:
            # --kv-cache-dtype auto; llama.cpp: its default f16)
            **info[name],
            "decode_tokens_per_s": 1 / d,
            "decode_tokens_per_s_per_round": per_round[name],
            "prefill_tokens_per_s": {str(p): p / median(v) for p, v in prefill[name].items()},
            "decode_tokens_per_s_at_context": {str(big): 1 / median(decode_long[name])},
            "decode_tokens_per_s_at_context_per_round": long_round[name],
            # B sequences decoding together: total tokens/s (median over rounds; each round's)
            "batched_decode_tokens_per_s": {str(b): median(v) for b, v in batched[name].items()},
            "batched_decode_tokens_per_s_per_round": {str(b): v for b, v in batched[name].items()},
        }
    goals, per_round_ratio, long_ratio, long_per_round, batch_ratio = [], {}, {}, {}, {}
    paired = lambda a, b, key: [x / y for x, y in zip(a[key], b[key], strict=True)]  # noqa: E731
    for ours, theirs in PAIRS.items():
        a, b = rows.get(f"qwen35 {ours}"), rows.get(f"llama.cpp {theirs}")
        if a and b:
            # rounds run the engines back to back: each round's ratio is a paired measure, and
            # their median the summary (a ratio of medians pooled over rounds mixes minutes of
            # different bandwidth: a 4B run printed 0.98x over per-round 1.13x and 1.10x)
            per_round_ratio[ours] = paired(a, b, "decode_tokens_per_s_per_round")
            long_per_round[ours] = paired(a, b, "decode_tokens_per_s_at_context_per_round")
            long_ratio[ours] = median(long_per_round[ours])
            key = "batched_decode_tokens_per_s_per_round"  # {batch size: each round's}
            batch_ratio[ours] = {n: paired(a[key], b[key], n) for n in a[key]}
            goals.append(
                goal(
                    f"{ours} decode vs llama.cpp {theirs} (x, median of the rounds)",
                    median(per_round_ratio[ours]),
                    1.0,
                )
            )
            goals.append(
                goal(
                    f"{ours} prefill@{big} vs llama.cpp {theirs} (x)",
                    ratio(a["prefill_tokens_per_s"][str(big)], b["prefill_tokens_per_s"][str(big)]),
                    1.0,
                )
            )
    fp8, i8 = rows.get("qwen35 fp8"), rows.get("qwen35 int8")
    if fp8 and i8:
        goals.append(
            goal("fp8 decode vs int8 decode (x, >= 1/1.3)",
                 ratio(fp8["decode_tokens_per_s"], i8["decode_tokens_per_s"]), 1 / 1.3)
        )  # fmt: skip
    base = rows["qwen35 bf16"]["decode_tokens_per_s"]
    for r in rows.values():
        r["decode_vs_qwen35_bf16"] = ratio(r["decode_tokens_per_s"], base)
    return {
        "prompt_len": sz["prompt"],
        "new_tokens": sz["new"],
        "long_context": big,  # decode_tokens_per_s_at_context's context
        "long_context_new_tokens": sz["long_new"],
        "rounds": sz["rounds"],
        "llama_cpp": llama or "ran",
        # engines measured together (rounds interleave them): all at once, or one pair at a
        # time where together they would not fit in memory; engines not run, and why; the
        # group before which the bench model's weights were freed (None: kept)
        "groups": groups,
        "skipped": skipped,
        "bench_model_released_before_group": release_at,
        "engines": rows,
        "decode_ratio_per_round": per_round_ratio,  # ours vs llama.cpp, by our format
        "decode_at_context_ratio": long_ratio,  # the same after the longest prefill
        "decode_at_context_ratio_per_round": long_per_round,
        "batches": list(sz["batches"]),
        "batch_steps": sz["batch_steps"],
        "batched_decode_ratio_per_round": batch_ratio,  # by our format, then batch size
        "goals": goals,
    }
