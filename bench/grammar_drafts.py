"""Drafts for constrained requests, under the grammar against without it, and no drafts.

    python bench/grammar_drafts.py [--method mtp|ngram] [--model Qwen3.5-0.8B] [--k 2]
                                   [--tokens 64] [--rounds 3]

`mtp`: the MTP head's drafts under the grammar's mask (the largest MTP logit the grammar allows
after the tokens before it: model_runner._draft_tokens) against unmasked (as before 2026-12-07:
a draft the grammar forbids is rejected). `ngram`: prompt-lookup drafts cut to the prefix the
grammar accepts, else the tokens it forces (StructuredOutputManager.drafts, jump-forward as
drafts) against plain prompt lookup. Three engines on the same random weights (the MTP head
loaded), one greedy request in each, their decode steps alternating (the prefills apart; the
VM's slow and fast minutes fall on all three), batch 1 (the case where drafts are verified),
each grammar's output `--tokens` long. Random weights make the model's choice among the tokens a
grammar allows arbitrary, so a draft is right mostly where the grammar forces the token (a
literal digit: one token a digit in this vocabulary; JSON punctuation the schema fixes; a forced
tool call's tags and names: the server's `tool_choice: "required"` grammar); a
trained model agrees with its MTP head far more often, unmeasured here. Reports tokens/s and
accepted drafts / drafts per kind and grammar; the three engines' tokens must be equal.
"""

from __future__ import annotations

import argparse
import time

GRAMMARS = {
    "digits": {"regex": "[0-9]{8}(31415926535897932384626433832795){4}"},
    "timestamps": {"regex": r"(20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:00Z,){8}"},
    "json": {"json": {"type": "array", "minItems": 8, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "unit", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                       "unit": {"enum": ["celsius", "fahrenheit"]}, "ok": {"type": "boolean"}}}}},
}  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["mtp", "ngram"], default="mtp")
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.engine.runtime import configure_cpu_runtime
    from qwen35.engine.structured import tool_call_grammar
    from qwen35.request import SamplingParams, StructuredOutputs

    configure_cpu_runtime(args.threads)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype), mtp=True)
    kw = dict(max_model_len=args.tokens + 64, enable_prefix_caching=False)
    spec_kw = dict(num_speculative_tokens=args.k, speculative_method=args.method)
    engines = {"grammar": make_engine(bm, **spec_kw, **kw), "without": make_engine(bm, **spec_kw, **kw),
               "no drafts": make_engine(bm, **kw)}  # fmt: skip
    off = engines["without"].runner
    if args.method == "mtp":  # the drafts' argmax without the grammar's mask
        masked = off._draft_tokens
        off._draft_tokens = lambda m, seqs, after: masked(m, [], [])
    else:
        off.spec.grammar = None  # plain prompt lookup
    tok = engines["grammar"].tokenizer  # forced tool calls (tool_choice "required"): the server's grammar
    GRAMMARS["tool calls"] = {"grammar": tool_call_grammar(
        [WEATHER], multiple=True, call_open_id=tok.tool_call_start_id,
        call_close_id=tok.tool_call_end_id)}  # fmt: skip
    names = {"grammar": "under the grammar", "without": "without it", "no drafts": "no drafts"}
    prompt = list(range(1000, 1032))
    spent = {(g, e): [] for g in GRAMMARS for e in engines}
    drafted = {(g, e): [0, 0] for g in GRAMMARS for e in engines}
    for r in range(args.rounds + 1):  # round 0: warm-up (compiles the grammars)
        for g, so in GRAMMARS.items():
            sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                                structured_outputs=StructuredOutputs(**so))  # fmt: skip
            order = list(engines)[r % 3 :] + list(engines)[: r % 3]
            toks = {e: [] for e in engines}
            t = dict.fromkeys(engines, 0.0)
            before = {e: _stats(engines[e]) for e in engines}
            for e in order:  # the prefills, untimed
                engines[e].add_request(f"{g}-{e}-{r}", prompt, sp)
                toks[e] += [x for o in engines[e].step() for x in o.outputs[0].token_ids]
            while any(eng.has_unfinished_requests() for eng in engines.values()):
                for e in order:
                    if engines[e].has_unfinished_requests():
                        t0 = time.perf_counter()
                        out = engines[e].step()
                        t[e] += time.perf_counter() - t0
                        toks[e] += [x for o in out for x in o.outputs[0].token_ids]
            for e in engines:
                assert toks[e] == toks["grammar"], (g, e)
                if r:
                    spent[g, e].append((len(toks[e]) - 1) / t[e])
                    a, d = _stats(engines[e])
                    drafted[g, e][0] += a - before[e][0]
                    drafted[g, e][1] += d - before[e][1]
    print(f"{args.model} {args.dtype}, {args.method} k = {args.k}, {args.tokens} tokens, "
          f"{args.rounds} rounds; decode tokens/s")  # fmt: skip
    for g in GRAMMARS:
        base = spent[g, "no drafts"]
        for e in engines:
            rounds = spent[g, e]
            ratio = sorted(x / b for x, b in zip(rounds, base, strict=True))
            acc, n = drafted[g, e]
            print(f"  {g:10s} {names[e]:17s} {sorted(rounds)[len(rounds) // 2]:6.1f} "
                  f"({ratio[len(ratio) // 2]:.2f}x no drafts, rounds "
                  f"{', '.join(f'{x:.1f}' for x in rounds)})"
                  + (f", drafts accepted {acc}/{n} ({acc / n:.0%})" if n else ""))  # fmt: skip


def _stats(engine) -> tuple[int, int]:
    spec = engine.runner.spec
    return (spec.stats.accepted, spec.stats.drafts) if spec is not None else (0, 0)


if __name__ == "__main__":
    main()
