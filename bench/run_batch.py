"""`qwen35 run-batch` with its requests one at a time (window 1) against the default window (all
in flight, batched continuously), one engine, rounds interleaved: wall seconds per batch and
output tokens/s. Qwen3.5-0.8B config, random weights, `--dtype auto`, greedy completions with
prompts of 32-256 tokens; how many batched texts equal the one-at-a-time ones is printed (in bf16
a batch's shared matmuls may flip a greedy token now and then: README, "Decode GEMVs").

    python bench/run_batch.py [--requests 16] [--tokens 32] [--rounds 3] [--threads 2] [--dtype auto] [--model Qwen3.5-0.8B]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


def batch(app, lines: list[str], window: int) -> tuple[float, list[str]]:
    from qwen35.server.batch import run_batch

    results: list[dict] = []

    async def go():
        async with app.router.lifespan_context(app):
            await run_batch(app, lines, window, lambda r, _c: results.append(r))

    t0 = time.perf_counter()
    asyncio.run(go())
    dt = time.perf_counter() - t0
    assert all(r["response"]["status_code"] == 200 for r in results), results[0]
    return dt, [r["response"]["body"]["choices"][0]["text"] for r in results]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B", help="catalog name or config (random weights)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="auto | bf16 | fp32 (fp32: batched == alone)")
    a = ap.parse_args(argv)
    import torch

    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.server.app import ServerConfig, create_app

    torch.set_num_threads(a.threads)
    bm = load_bench_model(BenchOptions(model=a.model, threads=a.threads, dtype=a.dtype))
    eng = make_engine(bm, max_num_seqs=a.requests, max_model_len=1024, enable_prefix_caching=False)
    g = torch.Generator().manual_seed(0)
    vocab = bm.model.config.vocab_size
    lines = []
    for i in range(a.requests):
        n = int(torch.randint(32, 257, (1,), generator=g))
        prompt = torch.randint(0, min(150000, vocab), (n,), generator=g).tolist()
        body = {"prompt": prompt, "max_tokens": a.tokens, "temperature": 0, "ignore_eos": True}
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/completions", "body": body}))  # fmt: skip
    config = ServerConfig(served_model_name="bench")
    batch(create_app(eng, config), lines[:2], 2)  # warm-up
    res: dict[str, list[tuple[float, list[str]]]] = {"window 1": [], "batched": []}
    for r in range(a.rounds):
        for name in (["window 1", "batched"] if r % 2 == 0 else ["batched", "window 1"]):
            window = 1 if name == "window 1" else a.requests
            res[name].append(batch(create_app(eng, config), lines, window))
    alone = res["window 1"][0][1]
    assert all(t == alone for _, t in res["window 1"]), "one at a time: texts differ between rounds"
    # bf16: a batch's shared matmuls may flip a greedy token now and then (README, "Decode GEMVs")
    same = [sum(x == y for x, y in zip(alone, t, strict=True)) for _, t in res["batched"]]
    out_tokens = a.requests * a.tokens
    print(f"{a.model}, {bm.label}, {a.threads} threads, {a.requests} completions "
          f"(prompts 32-256 tokens, {a.tokens} tokens each): seconds per batch per round")  # fmt: skip
    for name, rows in res.items():
        secs = [dt for dt, _ in rows]
        print(f"  {name:9s} " + "  ".join(f"{s:7.2f}" for s in secs)
              + f"   ({out_tokens / statistics.median(secs):.1f} output tok/s at the median)")  # fmt: skip
    print(f"  batched texts equal to one at a time, per round: {same} of {a.requests}")
    ratios = [w[0] / b[0] for w, b in zip(res["window 1"], res["batched"], strict=True)]
    print(f"  speed-up per round {' '.join(f'{x:.2f}' for x in ratios)} (median "
          f"{statistics.median(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
