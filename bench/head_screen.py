"""CPU decode steps with and without the int8 screen of lm_head, interleaved in one run.

    python bench/head_screen.py [--formats fp32 bf16] [--rounds 6] [--steps 32] [--threads N]
                                [--batch B] [--top-k K] [--gemm] [--head-only] [--rescore]

Qwen3.5-0.8B config, random weights, one engine per format (models/head_screen.py built by the
engine); the same decode steps (128-token prompts; greedy, or with `--top-k K` seeded samples
at temperature 0.7, top_k K, top_p 0.8) run with the screen (`screen`) and with
the whole head (`full`: `runner.head_screen` set to None; `--gemm` adds the whole head through
torch's GEMM past 8 bf16 rows, as before layers.linear.head_linear), alternating every round, so the
memory bandwidth's drift hits both alike. Also the head's build time, its bytes, and the
screen's candidates per step. Medians of the steps' wall times; the tokens of both modes must be
equal (the run stops otherwise). Writes bench/results/head_screen.json. `--head-only`: the head
alone at 1-16 rows (--rows: more; HeadScreen.max_rows is set from these): the full head, the
screen (kernels/head_screen_cpu.cpp), the same with the kernel's VNNI dots one input row at a
time (as before 4-16 rows went into a vector's lanes) and the screen through its PyTorch twin.
`--rescore`: the exact logits of 4,096-16,384 candidates (the screen's second half) alone.
`--build`: building the screen at engine start, the heads of the 0.8B / 4B / 9B (hidden 1024 /
2560 / 4096): small_ops_cpu.cpp quantize_head against its PyTorch reference (the build before
2026-12-07), and the finiteness check by count_nonfinite against torch.isfinite, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
from qwen35.layers.linear import HEAD_GEMV_MAX_ROWS
from qwen35.models.head_screen import HeadScreen
from qwen35.request import SamplingParams

MODES = ("full", "screen")


def _steps(engine, n: int, rid: str, batch: int, top_k: int) -> tuple[list[float], dict]:
    for i in range(batch):  # 128-token prompts, each its own
        sp = SamplingParams(max_tokens=n + 2, temperature=0.0, ignore_eos=True)
        if top_k:  # the same seed in both modes: the same draws
            sp = SamplingParams(max_tokens=n + 2, temperature=0.7, top_k=top_k, top_p=0.8,
                                seed=i, ignore_eos=True)  # fmt: skip
        engine.add_request(f"{rid}-{i}", list(range(100 + i, 228 + i)), sp)
    times, tokens = [], {}
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        for out in engine.step():  # deltas
            key = out.request_id.rsplit("-", 1)[1]
            tokens.setdefault(key, []).extend(out.outputs[0].token_ids if out.outputs else [])
        times.append(time.perf_counter() - t0)
    return times[2:], tokens  # the prefill and the first decode step left out


def _interleaved(calls: dict, rounds: int, before=None) -> dict[str, float]:
    """Median ms of each call, the calls one after another in every round (before(): run ahead
    of each, untimed)."""
    ms: dict[str, list[float]] = {m: [] for m in calls}
    for _ in range(rounds):
        for mode, call in calls.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            call()
            ms[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) * 1e3 for m, v in ms.items()}


def head_only(fmt: str, rounds: int, rows_list=(1, 2, 4, 8, 16)) -> dict:
    """The 0.8B-sized head alone (248320 x 1024, random): the full head (layers.linear) vs the
    screen + exact rows (HeadScreen.tokens) vs the same through the screen's PyTorch twin
    (`candidates_reference`: `twin`), 1-16 rows, caches evicted before every call. fmt
    "bf16:fp32": a bf16 head under fp32 rows (--dtype auto on CPUs without native bf16)."""

    from qwen35.kernels import gemv
    from qwen35.layers.linear import gemm, head_linear
    from qwen35.quant.matmul import widened_linear

    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    rows = torch.float32 if fmt in ("fp32", "bf16:fp32") else torch.bfloat16
    V, K = 248320, 1024
    w = (torch.randn(V, K) * 0.02).to(dtype)
    head = HeadScreen(w, rows)
    head.max_rows = max(rows_list)  # past HeadScreen's own limit too: that is what is measured
    kernel = gemv.load_screen

    def twin(x, ks):
        gemv.load_screen = lambda: None
        try:
            return head._exact(x, ks)
        finally:
            gemv.load_screen = kernel

    def rowwise(x, ks):  # the kernel's one-input-row-at-a-time dots at every row count
        mod = kernel()
        old = mod.set_lanes_min_rows(99)
        try:
            return head._exact(x, ks)
        finally:
            mod.set_lanes_min_rows(old)

    evict = [torch.randn(V, K // 2) for _ in range(2)]  # 1 GB read between calls
    out = {}
    # full: what the engine's head runs (bf16 past 8 rows: the GEMV kernel 8 rows a call); gemm:
    # torch's GEMM, which bf16 rows past 8 took before
    calls = {"full": lambda x, ks: head_linear(x, w), "screen": head._exact, "twin": twin,
             "gemm": lambda x, ks: widened_linear(x, w) if x.dtype != w.dtype else gemm(x, w)}  # fmt: skip
    if kernel() is not None and kernel().vnni():
        calls["rowwise"] = rowwise
    for M in rows_list:
        x = torch.randn(M, K).to(rows)
        med = _interleaved({m: lambda c=c, x=x: c(x, [1] * len(x)) for m, c in calls.items()}, rounds,
                           before=lambda: [t.sum() for t in evict])  # fmt: skip
        out[M] = med
        print(f"{fmt} head alone, {M} rows: full {med['full']:.2f} ms, screen {med['screen']:.2f}"
              f" ({med['full'] / med['screen']:.2f}x), its PyTorch twin {med['twin']:.2f}"
              f" (kernel {med['twin'] / med['screen']:.2f}x)"
              + (f", its row-by-row VNNI dots {med['rowwise']:.2f}" if "rowwise" in med else "")
              + f"; the library GEMM (layers.linear.gemm) {med['gemm']:.2f}")  # fmt: skip
    return out


def rescore(fmt: str, rounds: int) -> dict:
    """The screen's second half alone: the exact logits of C candidates (their weight rows
    gathered, then layers.linear.head_linear) at the most rows the screen takes, the rows gathered into a
    fresh tensor each call (as HeadScreen does) and into a buffer kept between calls,
    alternating; the full head beside."""
    from qwen35.layers.linear import head_kernel_rows, head_linear
    from qwen35.models.head_screen import SCREEN_ROWS

    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    V, K = 248320, 1024
    w = (torch.randn(V, K) * 0.02).to(dtype)
    M = min(head_kernel_rows(dtype, w), SCREEN_ROWS)  # the rows of one screen's exact step
    x = torch.randn(M, K).to(dtype)
    out = {}
    for C in (4096, 8192, 16384):
        cand = torch.randperm(V)[:C].sort().values
        buf = torch.empty(C, K, dtype=dtype)
        out[C] = med = _interleaved({  # head_linear: as HeadScreen._exact and the full head
            "reused": lambda c=cand, b=buf: head_linear(x, torch.index_select(w, 0, c, out=b)),
            "fresh": lambda c=cand: head_linear(x, w.index_select(0, c)),
            "full": lambda: head_linear(x, w)}, rounds)  # fmt: skip
        print(f"{fmt}, {M} rows, {C} candidates ({C * K * w.element_size() >> 20} MiB): exact "
              f"logits {med['fresh']:.2f} ms (gathered into a kept buffer {med['reused']:.2f}); "
              f"the full head {med['full']:.2f}")  # fmt: skip
    return out


def build(fmt: str, rounds: int, vocab: int = 248320, widths=(1024, 2560, 4096)) -> dict:
    """Milliseconds to build the screen of a `vocab`-token head: the kernel and its reference, and
    the finiteness check HeadScreen.build runs first, each way (medians, interleaved)."""
    from qwen35.kernels import small_ops
    from qwen35.models.head_screen import _BUILD_ROWS, quantize_head_reference
    from qwen35.weights import count_nonfinite

    mod = small_ops.load()
    if mod is None:
        raise SystemExit("small_ops_cpu.cpp did not build: nothing to compare")
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    out = {}
    for K in widths:
        w = (torch.randn(vocab, K) * 0.02).to(dtype)
        med = _interleaved({
            "kernel": lambda w=w: mod.quantize_head(w),
            "reference": lambda w=w: quantize_head_reference(w),
            "count_nonfinite": lambda w=w: count_nonfinite(w),
            "isfinite": lambda w=w: all(bool(torch.isfinite(w[i : i + _BUILD_ROWS]).all())
                                        for i in range(0, len(w), _BUILD_ROWS))}, rounds)  # fmt: skip
        out[K] = med
        print(f"{fmt} head {vocab} x {K}: build {med['kernel']:.0f} ms (reference "
              f"{med['reference']:.0f}, {med['reference'] / med['kernel']:.1f}x); finite check "
              f"{med['count_nonfinite']:.0f} ms (torch.isfinite {med['isfinite']:.0f})")  # fmt: skip
        del w
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16"],
                    help="fp32 bf16; --head-only also bf16:fp32 (a bf16 head, fp32 rows)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--top-k", type=int, default=0, help="sampled rows with this top_k")
    ap.add_argument("--head-only", action="store_true", help="time the head alone, 1-16 rows")
    ap.add_argument("--rows", default="1,2,4,8,16", help="--head-only: row counts")
    ap.add_argument("--gemm", action="store_true",
                    help="a third mode: the full head through torch's GEMM past 8 bf16 rows")
    ap.add_argument("--rescore", action="store_true",
                    help="time the exact logits of 4K-16K candidates alone")  # fmt: skip
    ap.add_argument("--build", action="store_true",
                    help="time building the screen (kernel vs PyTorch reference)")  # fmt: skip
    ap.add_argument("--vocab", type=int, default=248320, help="--build: the head's rows")
    args = ap.parse_args(argv)
    results = {}
    if args.build:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        for f in args.formats:
            build(f, args.rounds, args.vocab)
        return
    if args.rescore:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        for f in args.formats:
            rescore(f, args.rounds)
        return
    if args.head_only:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        rows = [int(r) for r in args.rows.split(",")]
        doc = {f: head_only(f, args.rounds, rows) for f in args.formats}
        out = Path(__file__).with_name("results") / "head_screen_alone.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        return
    for fmt in args.formats:
        opts = BenchOptions(dtype=fmt, threads=args.threads)
        engine = make_engine(load_bench_model(opts), max_model_len=1024, max_num_seqs=args.batch)
        head = engine.runner.head_screen
        if head is None:
            raise SystemExit(f"{fmt}: the engine built no head screen here (HeadScreen.build)")
        t0 = time.perf_counter()
        HeadScreen(head.weight)
        build_s = time.perf_counter() - t0
        x = torch.randn(1, head.weight.shape[1]).to(head.weight.dtype)
        got = head.candidates(x, [max(1, args.top_k)])
        cands = None if got is None else len(got)  # None: over MAX_CANDIDATES (undecided)
        decided: list[bool] = []  # per screened step: did it decide (else the full head ran too)

        def counted(fn, log=decided):
            def wrapper(*a):
                out = fn(*a)
                log.append(out is not None)
                return out

            return wrapper

        head.tokens, head.logits = counted(head.tokens), counted(head.logits)

        _steps(engine, 4, "warm", args.batch, args.top_k)
        modes = MODES + (("gemm",) if args.gemm else ())
        times: dict[str, list[float]] = {m: [] for m in modes}
        kernel_rows = dict(HEAD_GEMV_MAX_ROWS)
        for r in range(args.rounds):
            toks = {}
            for mode in modes if r % 2 == 0 else modes[::-1]:
                engine.runner.head_screen = head if mode == "screen" else None
                HEAD_GEMV_MAX_ROWS.clear()  # gemm: bf16 rows past 8 through torch's GEMM
                HEAD_GEMV_MAX_ROWS.update({} if mode == "gemm" else kernel_rows)
                rid = f"{fmt}-{r}-{mode}"
                t, toks[mode] = _steps(engine, args.steps, rid, args.batch, args.top_k)
                times[mode] += t
            if toks["full"] != toks["screen"]:
                raise SystemExit(f"{fmt}: the screen changed the tokens: {toks}")
        engine.runner.head_screen = head
        HEAD_GEMV_MAX_ROWS.update(kernel_rows)
        med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
        results[fmt] = {
            "median_step_ms": med,
            "speedup": med["full"] / med["screen"],
            "steps": {m: len(t) for m, t in times.items()},
            "head_build_s": build_s,
            "screen_bytes": head.nbytes,
            "head_bytes": head.weight.numel() * head.weight.element_size(),
            "candidates_random_row": cands,
            "screen_decided": sum(decided) / max(1, len(decided)),
        }
        if "gemm" in med:
            print(f"{fmt}: the full head through torch's GEMM past 8 bf16 rows {med['gemm']:.2f}")
        print(f"{fmt}: median step ms full {med['full']:.2f}, screen {med['screen']:.2f} "
              f"({med['full'] / med['screen']:.3f}x); screen {head.nbytes / 2**20:.0f} MiB "
              f"built in {build_s:.2f} s; {cands} candidates for a random row; the screen "
              f"decided {sum(decided)} of {len(decided)} screened steps")  # fmt: skip
    out = Path(__file__).with_name("results") / "head_screen.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"threads": torch.get_num_threads(), "batch": args.batch, "top_k": args.top_k,
           "formats": results}  # fmt: skip
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
