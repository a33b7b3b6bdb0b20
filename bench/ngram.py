"""N-gram (prompt-lookup) drafts against plain decoding, batch 1, one process, rounds
interleaved: ms per generated token and the drafts' acceptance. Qwen3.5-0.8B config, random
weights, `--dtype auto`, greedy (the same tokens either way: checked). Random weights make
this a measurement of the mechanism, not of a workload: a random model's greedy output soon
repeats itself, which is what prompt lookup feeds on (real outputs that copy their input -
edits, extraction, RAG quotes - do the same; free text far less).

    python bench/ngram.py [--k 3] [--tokens 96] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def run(eng, prompt, n: int, tag: str) -> tuple[float, list[int]]:
    from qwen35.request import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    eng.add_request(tag, prompt, sp)
    toks: list[int] = []
    t0 = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.outputs and o.outputs[0].token_ids and t0 is None:
                t0 = time.perf_counter()  # after the prefill (the first token)
                toks.extend(o.outputs[0].token_ids)
                continue
            toks.extend(o.outputs[0].token_ids if o.outputs else [])
    return (time.perf_counter() - t0) / max(1, len(toks) - 1) * 1e3, toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine

    torch.set_num_threads(a.threads)
    bm = load_bench_model(BenchOptions(threads=a.threads))
    kw = dict(max_num_seqs=1, max_model_len=1024, enable_prefix_caching=False)
    plain = make_engine(bm, **kw)
    spec = make_engine(bm, num_speculative_tokens=a.k, speculative_method="ngram", **kw)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 150000, (64,), generator=g).tolist() * 3
    run(plain, prompt, 8, "warm-p")
    run(spec, prompt, 8, "warm-s")
    res = {"plain": [], "ngram": []}
    for r in range(a.rounds):
        for name in (["plain", "ngram"] if r % 2 == 0 else ["ngram", "plain"]):
            eng = plain if name == "plain" else spec
            ms, toks = run(eng, prompt, a.tokens, f"{name}{r}")
            res[name].append((ms, toks))
    assert all(t == res["plain"][0][1] for _, t in res["plain"] + res["ngram"]), "tokens differ"
    st = spec.get_stats()
    acc = st["spec_accepted_total"] / max(1, st["spec_drafts_total"])
    print(f"Qwen3.5-0.8B config, {bm.label}, {a.threads} threads, batch 1, {a.tokens} tokens "
          f"after a 192-token prompt; ngram k={a.k}: ms per token per round")  # fmt: skip
    for name, rows in res.items():
        print(f"  {name:6s} " + "  ".join(f"{ms:7.2f}" for ms, _ in rows))
    ratios = [p[0] / s[0] for p, s in zip(res["plain"], res["ngram"], strict=True)]
    print(f"  speed-up per round {' '.join(f'{x:.2f}' for x in ratios)} (median "
          f"{statistics.median(ratios):.2f}); drafts accepted {acc:.0%} "
          f"({st['spec_accepted_total']} of {st['spec_drafts_total']})")  # fmt: skip


if __name__ == "__main__":
    main()
