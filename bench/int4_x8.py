"""int4 decode with the GEMVs' activations rounded to 8 bits per 32 inputs (Int4Linear.x8, the
default) against kept at bf16 / 16 bits (x8 off), one int4 model in one process, decode steps
interleaved step by step (this VM's bandwidth moves minute to minute; only such ratios count).

    python bench/int4_x8.py [--model Qwen3.5-0.8B] [--batches 1 4 16] [--steps 40] [--threads 2]
    python bench/int4_x8.py --model DIR/config.json      # e.g. bench/moe_decode.py --write-config
    python bench/int4_x8.py --batches --prefill 2048 --rounds 4   # prefill only
    QWEN35_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/int4_x8.py --dtype fp32               # as on an AVX2-only CPU (Zen 3)

Per batch size: two engines over the same weights, one per setting, each with that many 64-token
random prompts in flight (prefill and a few steps untimed); then `--steps` decode steps each, in
alternating order, the model's CPU decode plan (built per setting: it reads x8 when built)
swapped in before each. Prints the median step of each and the median of the per-pair ratios.
`--prefill N`: also one N-token prompt's prefill per setting and round (longer inputs round x
before the GEMM under x8: what that pass costs), settings alternating, `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def run(args) -> dict:
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.quant.layers import Int4Linear, set_int4_activations
    from qwen35.request import SamplingParams

    torch.set_num_threads(args.threads)
    opts = BenchOptions(model=args.model, threads=args.threads, dtype=args.dtype)
    bm = load_bench_model(opts, quantization="int4")
    vocab = min(150000, bm.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    out = {}
    try:
        for b in args.batches:
            engines, plans = {}, {}
            for x8 in (True, False):  # (each engine sets Int4Linear.x8 and drops the plan)
                eng = make_engine(bm, max_num_seqs=b, max_model_len=64 + args.steps + 16,
                                  enable_prefix_caching=False,
                                  int4_activations="int8" if x8 else "16bit")  # fmt: skip
                sp = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
                for i in range(b):
                    prompt = torch.randint(0, vocab, (64,), generator=g).tolist()
                    eng.add_request(f"{x8}-{i}", prompt, sp)
                for _ in range(4):  # prefill and the first decode steps, untimed
                    eng.step()
                engines[x8], plans[x8] = eng, bm.model._decode_plan
            times: dict = {True: [], False: []}
            for s in range(args.steps):
                for x8 in (True, False) if s % 2 == 0 else (False, True):
                    Int4Linear.x8, bm.model._decode_plan = x8, plans[x8]
                    t0 = time.perf_counter()
                    engines[x8].step()
                    times[x8].append(time.perf_counter() - t0)
            ratios = [o / n for n, o in zip(times[True], times[False], strict=True)]
            out[b] = (statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3,
                      statistics.median(ratios))  # fmt: skip
            del engines, plans
        if args.prefill:
            out["prefill"] = _prefill(bm, args, vocab, g)
    finally:
        set_int4_activations(bm.model, True)  # the default
    return out


def _prefill(bm, args, vocab: int, g) -> tuple[float, float, float]:
    """(x8, 16-bit median tok/s, median of per-round ratios) of an args.prefill-token prefill."""
    from qwen35.benchmarks.common import make_engine, timed_request
    from qwen35.quant.layers import set_int4_activations

    engines = {x8: make_engine(bm, max_num_seqs=1, max_model_len=args.prefill + 8,
                               enable_prefix_caching=False,
                               int4_activations="int8" if x8 else "16bit")
               for x8 in (True, False)}  # fmt: skip
    rates: dict = {True: [], False: []}
    for r in range(args.rounds):
        prompt = torch.randint(0, vocab, (args.prefill,), generator=g).tolist()
        for x8 in (True, False) if r % 2 == 0 else (False, True):
            set_int4_activations(bm.model, x8)
            seconds, _, _ = timed_request(engines[x8], prompt, 1, f"p{r}{x8}")
            rates[x8].append(args.prefill / seconds)
    ratios = [n / o for n, o in zip(rates[True], rates[False], strict=True)]
    return statistics.median(rates[True]), statistics.median(rates[False]), statistics.median(ratios)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B", help="catalog name or config.json")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="auto / bf16 / fp32 (compute dtype)")
    ap.add_argument("--prefill", type=int, default=0, help="also time a prompt this long")
    ap.add_argument("--rounds", type=int, default=4, help="prefill rounds per setting")
    args = ap.parse_args(argv)
    for b, (new, old, ratio) in run(args).items():
        if b == "prefill":
            print(f"prefill of {args.prefill}: x8 {new:.1f}, 16-bit {old:.1f} tok/s "
                  f"(x8 / 16-bit, median of rounds: {ratio:.2f}x)")  # fmt: skip
        else:
            print(f"batch {b}: x8 {new:.2f} ms, 16-bit {old:.2f} ms per decode step "
                  f"(16-bit / x8, median of step pairs: {ratio:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
