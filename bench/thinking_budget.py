"""What a pending thinking_token_budget costs a decode: greedy batch-1 decode of a chat prompt
that opens a think block, without a budget, with one never reached, and with one reached halfway,
rounds interleaved in one process (one engine). Only the budget's own position leaves the fast
paths (the head screen, multi-step decoding), so the three should match.

    python bench/thinking_budget.py                     # Qwen3.5-0.8B config, random weights
    python bench/thinking_budget.py --model Qwen3.5-2B --tokens 96 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B", help="a catalog name or a model directory")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded a run")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from qwen35.engine.llm_engine import LLM
    from qwen35.request import SamplingParams

    llm = LLM(args.model, load_format="random", dtype=args.dtype, verbose=False,
              max_model_len=4096)  # fmt: skip
    msgs = [{"role": "user", "content": "Why is the sky blue? Explain in detail."}]
    prompt = llm.tokenizer.encode(llm.engine.chat_template.render(msgs, enable_thinking=True))
    cases = {"no budget": None, "budget never reached": 1 << 30,
             "budget halfway": args.tokens // 2}  # fmt: skip

    def run(budget):
        sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                            thinking_token_budget=budget)  # fmt: skip
        t = time.perf_counter()
        llm.generate([prompt], sp)
        return args.tokens / (time.perf_counter() - t)

    run(None)  # warm-up
    got: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, budget in cases.items():
            got[name].append(run(budget))
    print(f"{args.model}, {args.tokens} greedy tokens a run (prefill included), {args.rounds} rounds")
    for name, tps in got.items():
        print(f"  {name:22s} median {statistics.median(tps):6.2f} tok/s  "
              f"({', '.join(f'{x:.2f}' for x in tps)})")


if __name__ == "__main__":
    main()
