"""Batch-1 decode after a long prompt by K/V cache dtype (`--kv-cache-dtype`): one model (fp32
compute; weights as --quantization stores them), one engine per cache dtype sharing its
weights, the engines alternating round by round in one process.

    python bench/kv_dtype.py [--model Qwen3.5-0.8B] [--quantization int4] [--contexts 2048 4096]
                             [--kv fp32 bf16 fp16 fp8] [--rounds 4] [--new-tokens 48] [--threads 2]

Every round sends each engine the same prompt per context; the first round prefills it, later
rounds find it in the prefix cache (only the last few tokens are recomputed), so the rounds time
decode at that context for the price of one prefill. Prints the median decode step per engine
and context over the rounds (random weights; compare within one run only) and how many greedy
tokens equal the first engine's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def run(args) -> dict:
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.loader import load_model
    from qwen35.request import SamplingParams

    torch.set_num_threads(args.threads)
    quant = None if args.quantization == "none" else args.quantization
    model = load_model(args.model, dtype="fp32", load_format="random", seed=0, progress=False,
                       quantization=quant)  # fmt: skip
    engines = {
        kv: LLMEngine(model, verbose=False, max_num_seqs=1, kv_cache_dtype=kv,
                      max_model_len=max(args.contexts) + args.new_tokens + 16)
        for kv in args.kv
    }  # fmt: skip
    vocab = model.config.vocab_size
    steps: dict = {(kv, c): [] for kv in engines for c in args.contexts}
    same: dict = {(kv, c): 0 for kv in engines for c in args.contexts}
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for r in range(args.rounds):
        for c in args.contexts:
            g = torch.Generator().manual_seed(c)
            prompt = torch.randint(2, vocab, (c,), generator=g).tolist()
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            toks = {}
            for kv in order:
                eng = engines[kv]
                eng.add_request(f"{kv}-{r}-{c}", prompt, sp)
                out, times = [], []
                while eng.has_unfinished_requests():
                    t = time.perf_counter()
                    res = eng.step()
                    if out:  # a decode step (the steps up to the first token are prefill)
                        times.append(time.perf_counter() - t)
                    out += [tok for o in res if o.outputs for tok in o.outputs[0].token_ids]
                steps[kv, c].append(statistics.median(times))
                toks[kv] = out
            first = toks[args.kv[0]]
            for kv, t in toks.items():
                same[kv, c] += sum(a == b for a, b in zip(t, first, strict=False))
    return {"ms": {k: 1000 * statistics.median(v) for k, v in steps.items()}, "same": same}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen3.5-0.8B")
    p.add_argument("--quantization", default="int4", choices=["none", "bf16", "int8", "int4"])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--kv", nargs="+", default=["fp32", "bf16", "fp16"],
                   choices=["fp32", "bf16", "fp16", "fp8"])  # fmt: skip
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    res = run(args)
    base = args.kv[0]
    total = args.rounds * args.new_tokens
    for c in args.contexts:
        cells = []
        for kv in args.kv:
            ms = res["ms"][kv, c]
            vs = f" ({res['ms'][base, c] / ms:.2f}x)" if kv != base else ""
            cells.append(f"{kv} {ms:6.2f} ms{vs}, {res['same'][kv, c]}/{total} tokens as {base}")
        print(f"context {c:6d}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
