"""Batch-1 CPU decode steps with the per-token Python cut in stages, interleaved in one process.

    python bench/decode_overhead.py [--formats bf16 int4] [--rounds 6] [--steps 32] [--threads N]
                                    [--fake-gemv] [--model CONFIG] [--dtype D] [--batch N]

Qwen3.5-0.8B config (or --model's), random weights, one engine per format; the same decode steps
(128-token prompt) run in three modes, round-robin, so the memory bandwidth's drift between
minutes hits all of them alike:
- `modules`: the model's modules op by op (the fused layer entries and the decode plan off);
- `fused`: each DeltaNet / attention layer between its projections as one kernel call
  (ops/deltanet.py deltanet_decode_gated, ops/attention.py attention_decode_gated);
- `plan`: the CPU decode plan too (models/cpu_decode.py), the engine's default;
- MoE models also `plan-moe-module`: the plan with its MoE blocks through their module (the
  plan's MoE step off), e.g. `--model DIR/config.json` of bench/moe_decode.py; and
  `plan-moe-calls`: the plan's MoE step without `_held_block` (the separate kernel calls of
  few_token_moe and the shared expert, or the module where those do not resolve: FP8 on AVX2)
  instead of one `Int4Moe` / `Int8Moe` / `Fp8Moe` / `Bf16Moe` call a block.
`--dtype`: the rows' dtype of quantized formats (default bf16; `auto`: the engine's default, which
for `bf16` on a CPU without native bf16 is fp32 rows on bf16-stored weights).
`--batch N`: N sequences decoding together (prefilled one a step first). Medians of the steps' wall
times. `--fake-gemv` replaces every dense GEMV (the decode plan's own calls too) by its stored output
(bf16 / fp32 only; the lm_head screen and the experts are not faked) to isolate
what is not weight streaming. Results can only be compared within one run. Writes
bench/results/decode_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import qwen35.layers.deltanet as dn_layer
import qwen35.layers.full_attention as attn_layer
import qwen35.layers.linear as linear_mod
from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
from qwen35.models import cpu_decode
from qwen35.request import SamplingParams

MODES = ("modules", "fused", "plan")


def _set_mode(mode: str, real: dict, plans: dict | None = None, model=None) -> None:
    """Switch the fused layer entries and the plan on or off (module globals the layers use);
    plans: the two plans of a MoE model by mode, set as the model's."""
    off = lambda *args, **kw: None  # noqa: E731 - "does not apply": the op-by-op path runs
    dn_layer.deltanet_decode_gated = real["dn"] if mode != "modules" else off
    attn_layer.attention_decode_gated = real["attn"] if mode != "modules" else off
    applies = real["applies"] if mode.startswith("plan") else (lambda batch: False)
    cpu_decode.DecodePlan.applies = staticmethod(applies)
    if plans:
        model._decode_plan = plans[mode if mode in plans else "plan"]


def _plan_with(model, name: str, stand_in):
    """The model's decode plan built with models/cpu_decode.py's `name` replaced: `_moe` by the
    module's forward (`plan-moe-module`), `_held_block` by None (`plan-moe-calls`: no one-call
    objects for int4 / int8 / FP8 / bf16-stored blocks)."""
    real = getattr(cpu_decode, name)
    setattr(cpu_decode, name, stand_in)
    try:
        return cpu_decode.DecodePlan(model)
    finally:
        setattr(cpu_decode, name, real)


def _fake_gemvs() -> None:
    """Every dense linear returns a stored output for its shapes (no weight is read)."""
    real, stored = linear_mod.linear, {}

    def fake(x, w):
        key = (x.shape, w.shape, w.dtype)
        if key not in stored:
            stored[key] = real(x, w)
        return stored[key]

    linear_mod.linear = cpu_decode.linear = fake
    real_plain = cpu_decode._plain  # the decode plan's own kernel calls (resolved once a weight)

    def plain(w):
        fn = real_plain(w)

        def call(x):
            key = (x.shape, w.shape, w.dtype, "plan")
            if key not in stored:
                stored[key] = fn(x)
            return stored[key]

        return call

    cpu_decode._plain = plain


def _steps(engine, n: int, rid: str, batch: int = 1) -> list[float]:
    sp = SamplingParams(max_tokens=n + 2, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request(f"{rid}-{b}", list(range(100 + b, 228 + b)), sp)
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times[batch + 1 :]  # the prefills and the first decode step (plan built) left out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", nargs="+", default=["bf16", "int4"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fake-gemv", action="store_true")
    ap.add_argument("--model", default=None, help="a config.json (default: Qwen3.5-0.8B's)")
    ap.add_argument("--dtype", default="bf16", help="quantized formats' rows: bf16, fp32, auto")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    args = ap.parse_args()
    if args.fake_gemv:
        _fake_gemvs()
    real = dict(dn=dn_layer.deltanet_decode_gated, attn=attn_layer.attention_decode_gated,
                applies=cpu_decode.DecodePlan.applies)  # fmt: skip
    results = {}
    for fmt in args.formats:
        # (bf16 with --dtype auto: the engine's default, fp32 rows on bf16 storage where the CPU
        # has no native bf16)
        dtype = fmt if fmt == "fp32" or (fmt == "bf16" and args.dtype != "auto") else args.dtype
        opts = BenchOptions(dtype=dtype, threads=args.threads)
        if args.model:
            opts.model = args.model
        quant = None if fmt in ("fp32", "bf16") else fmt
        bm = load_bench_model(opts, quantization=quant)
        engine = make_engine(bm, max_model_len=1024, max_num_seqs=max(args.batch, 1))
        _set_mode("plan", real)
        _steps(engine, 4, "warm")  # (builds the plan)
        plans, modes = None, MODES
        if any(layer.is_moe for layer in bm.model.model.layers):
            plans = {"plan": bm.model._decode_plan,
                     "plan-moe-module": _plan_with(bm.model, "_moe", lambda mlp, dt: mlp.forward)}
            if fmt in ("int4", "int8", "fp8", "bf16"):
                plans["plan-moe-calls"] = _plan_with(bm.model, "_held_block", lambda mlp, dt: None)
            modes = (*MODES, *(m for m in plans if m != "plan"))
        times = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes:
                _set_mode(mode, real, plans, bm.model)
                times[mode] += _steps(engine, args.steps, f"{fmt}-{r}-{mode}", args.batch)
        _set_mode("plan", real, plans, bm.model)
        med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
        results[fmt] = {"median_step_ms": med, "steps": {m: len(t) for m, t in times.items()}}
        print(f"{fmt}{' (GEMVs faked)' if args.fake_gemv else ''}: median step ms "
              + ", ".join(f"{m} {v:.2f}" for m, v in med.items())
              + f"; modules / plan {med['modules'] / med['plan']:.3f}x"
              + "".join(f", {m} / plan {med[m] / med['plan']:.3f}x"
                        for m in (plans or ()) if m != "plan"))  # fmt: skip
    out = Path(__file__).with_name("results") / "decode_overhead.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"threads": torch.get_num_threads(), "fake_gemv": args.fake_gemv, "batch": args.batch,
           "formats": results}  # fmt: skip
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
