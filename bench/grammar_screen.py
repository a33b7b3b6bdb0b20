"""Decoding under a grammar on a CPU: the int8 head screen (a constrained row screens its 32
largest logits, greedy, or 4 top_k, sampled; where enough tokens the grammar allows are among
them the masked row keeps what the full one would, else the full head: model_runner.
_grammar_rows) against the full head for every such row (as before 2026-12-07), two engines on
the same weights, interleaved.

    python bench/grammar_screen.py [--sampling greedy|top20] [--model Qwen3.5-0.8B] [--tokens 48]
                                   [--rounds 3] [--dtype bf16]

`top20`: Qwen's recommended sampling (temperature 0.7, top_k 20, top_p 0.95; seeded).
Batch 1: one greedy request in each engine, their `--tokens` decode steps alternating (the
prefills apart), each engine's steps timed; the VM's slow and fast minutes fall on both.
Random weights rank tokens arbitrarily, so how often the screen decides depends on how much of
the vocabulary a grammar allows: most of it (free text, a permissive regex), nearly always;
digits only, almost never (the step then pays the screen and the full head, and the runner backs
off the screen for 2, 4, ... 64 steps). A trained model under JSON mostly ranks an allowed token
first; unmeasured here. Both engines' tokens must be equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

GRAMMARS = {
    "text": {"regex": "[^0-9<>{}]{1,1000}"},
    "json": {"json": {"type": "array", "minItems": 8, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "note"],
        "properties": {"name": {"type": "string"}, "note": {"type": "string"}}}}},
    "digits": {"regex": "[0-9]{1,1000}"},
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sampling", choices=["greedy", "top20"], default="greedy")
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.engine.runtime import configure_cpu_runtime
    from qwen35.request import SamplingParams, StructuredOutputs

    configure_cpu_runtime(args.threads)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype))
    kw = dict(max_model_len=args.tokens + 64, enable_prefix_caching=False)
    engines = {"screen": make_engine(bm, **kw), "full head": make_engine(bm, head_screen=False, **kw)}
    runner = engines["screen"].runner
    assert runner.head_screen is not None, "no head screen on this CPU / dtype"
    decided = []
    outcome = runner._screen_outcome

    def spy(kind, ok):
        if kind == "grammar":
            decided.append(ok)
        outcome(kind, ok)

    runner._screen_outcome = spy
    prompt = list(range(1000, 1032))
    res = {(g, e): [] for g in GRAMMARS for e in engines}
    rate = {g: [] for g in GRAMMARS}
    tokens = {}
    for r in range(args.rounds + 1):  # round 0: warm-up (compiles the grammars)
        for g, so in GRAMMARS.items():
            how = dict(temperature=0.0) if args.sampling == "greedy" else dict(
                temperature=0.7, top_k=20, top_p=0.95, seed=r)  # fmt: skip
            sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True, **how,
                                structured_outputs=StructuredOutputs(**so))  # fmt: skip
            order = list(engines)[r % 2 :] + list(engines)[: r % 2]
            runner._screen_skip["grammar"] = runner._screen_misses["grammar"] = 0
            decided.clear()
            toks = {name: [] for name in engines}
            spent = dict.fromkeys(engines, 0.0)
            for name in order:  # the prefills, untimed
                engines[name].add_request(f"{g}-{name}-{r}", prompt, sp)
                toks[name] += [t for o in engines[name].step() for t in o.outputs[0].token_ids]
            while any(e.has_unfinished_requests() for e in engines.values()):
                for name in order:  # the two engines' decode steps alternate
                    if engines[name].has_unfinished_requests():
                        t0 = time.perf_counter()
                        out = engines[name].step()
                        spent[name] += time.perf_counter() - t0
                        toks[name] += [t for o in out for t in o.outputs[0].token_ids]
            for name in engines:
                assert tokens.setdefault((g, r), toks[name]) == toks[name], (g, name)
                if r:
                    res[g, name].append((len(toks[name]) - 1) / spent[name])
            if r:
                rate[g].append((sum(decided), len(decided)))
    print(f"{args.model} {args.dtype}, {args.sampling}, batch 1, {args.tokens} tokens, "
          f"{args.rounds} rounds")  # fmt: skip
    for g in GRAMMARS:
        base = statistics.median(res[g, "full head"])
        for name in engines:
            med = statistics.median(res[g, name])
            extra = ""
            if name == "screen":
                ok, n = (sum(x) for x in zip(*rate[g], strict=True))
                extra = f", screen decided {ok} of {n} screened steps"
            print(f"  {g:7s} {name:9s} {med:6.1f} tok/s ({med / base:.2f}x the full head; rounds "
                  f"{', '.join(f'{x:.1f}' for x in res[g, name])}){extra}")  # fmt: skip


if __name__ == "__main__":
    main()
