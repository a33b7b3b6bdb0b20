"""MTP drafts for constrained requests: drafted under the grammar's mask (the largest MTP logit
the grammar allows after the tokens before it: model_runner._draft_tokens) against drafted
unmasked (as before 2026-12-07: a draft the grammar forbids is rejected) and no drafts,
interleaved.

    python bench/grammar_drafts.py [--model Qwen3.5-0.8B] [--k 2] [--tokens 64] [--rounds 3]

Random weights with the MTP head, one engine (the two kinds alternate by round, on the same
weights), one greedy request at a time (batch 1: the case where drafts are verified), each
grammar's output `--tokens` long. Random weights make the model's choice among the tokens a
grammar allows arbitrary, so a masked draft is right mostly where the grammar forces the token
(a literal digit: one token a digit in this vocabulary; JSON punctuation the schema fixes); a
trained model's MTP head agrees with it far more often, unmeasured here. Reports tokens/s and
accepted drafts / drafts per kind and grammar; both kinds' tokens must be equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

GRAMMARS = {
    "digits": {"regex": "[0-9]{8}(31415926535897932384626433832795){4}"},
    "timestamps": {"regex": r"(20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:00Z,){8}"},
    "json": {"json": {"type": "array", "minItems": 8, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "unit", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                       "unit": {"enum": ["celsius", "fahrenheit"]}, "ok": {"type": "boolean"}}}}},
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.engine.runtime import configure_cpu_runtime
    from qwen35.request import SamplingParams, StructuredOutputs

    configure_cpu_runtime(args.threads)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype), mtp=True)
    eng = make_engine(bm, num_speculative_tokens=args.k, max_model_len=512,
                      enable_prefix_caching=False)  # fmt: skip
    runner, spec = eng.runner, eng.runner.spec
    masked = runner._draft_tokens
    kinds = {"masked": masked, "unmasked": lambda m, seqs, after: masked(m, [], []),
             "no drafts": None}  # (the runner without its SpecState: one token a step)
    prompt = list(range(1000, 1032))
    res = {(g, k): {"s": [], "acc": 0, "drafts": 0, "tokens": None} for g in GRAMMARS for k in kinds}
    for r in range(args.rounds + 1):  # round 0: warm-up (compiles the grammars)
        for g, so in GRAMMARS.items():
            sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                                structured_outputs=StructuredOutputs(**so))  # fmt: skip
            for name in list(kinds)[r % 3 :] + list(kinds)[: r % 3]:
                runner.spec = spec if kinds[name] else None
                runner._draft_tokens = kinds[name] or masked
                a0, d0 = spec.stats.accepted, spec.stats.drafts
                eng.add_request(f"{g}-{name}-{r}", prompt, sp)
                t0 = time.perf_counter()
                toks = []  # (the engine's outputs are deltas)
                while eng.has_unfinished_requests():
                    toks += [t for o in eng.step() for t in o.outputs[0].token_ids]
                dt = time.perf_counter() - t0
                e = res[g, name]
                if e["tokens"] is None:
                    e["tokens"] = toks
                assert toks == e["tokens"] == res[g, "masked"]["tokens"], (g, name)
                if r:
                    e["s"].append(dt)
                    e["acc"] += spec.stats.accepted - a0
                    e["drafts"] += spec.stats.drafts - d0
    print(f"{args.model} {args.dtype}, k = {args.k}, {args.tokens} tokens, {args.rounds} rounds")
    for g in GRAMMARS:
        base = statistics.median(res[g, "unmasked"]["s"])
        for name in kinds:
            e = res[g, name]
            med = statistics.median(e["s"])
            rate = e["acc"] / max(1, e["drafts"])
            print(f"  {g:10s} {name:9s} {args.tokens / med:7.1f} tok/s ({base / med:.2f}x "
                  f"unmasked; rounds {', '.join(f'{args.tokens / t:.1f}' for t in e['s'])})"
                  + (f", drafts accepted {e['acc']}/{e['drafts']} ({rate:.0%})" if e["drafts"]
                     else ""))  # fmt: skip


if __name__ == "__main__":
    main()
