"""Streams in flight while a long prompt arrives: how long they wait between tokens, and the
prompt's time to first token, with prompt chunks paced (`max_decode_step_ms`, engine/
prefill_pacer.py) and without (whole `max_num_batched_tokens` chunks).

    python bench/decode_stalls.py [--model Qwen3.5-0.8B] [--streams 4] [--prompt 4096]
                                  [--step-ms 1000] [--rounds 3] [--threads 2] [--queued N]
                                  [--short 32] [--offline N]

Each round, for each engine in turn (order reversed every other round; both share one set of
random weights): --streams greedy requests of 64-token prompts start decoding, then a prompt of
--prompt tokens arrives, and after its first step a request of --short tokens; steps run until
both have their first token. Reported, medians over rounds: the prompt's time to first token
(from its arrival), the longest and the mean wait of the streams between tokens until then, the
streams' tokens in it, and the short request's time to first token (paced, it starts beside the
long prompt's chunk, in shares where it does not fit whole: Scheduler short_first). --queued N: a second prompt of N tokens arrives with the
first, ahead of the short request (which, paced, passes it: Scheduler._short_picks); its time to
first token is reported too, and the round runs until it has one. The prompt's first token is
compared between the engines: the cut on 64-token boundaries keeps a prompt's result, but in bf16
the rows a step batches with it can change its rounding (Qwen3.5-4B, --short 300 --prompt 2048:
the whole-chunk engine's last 4 prompt rows share a step with the short prompt, 308 rows through
the GEMM instead of 8 through the GEMV kernel, and the greedy token flips; the same engine without
the short request, and the prompt alone, uncut or cut on or off the grid, agree with the paced
engine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
from qwen35.request import SamplingParams


def one_round(engine, streams: list[list[int]], prompt: list[int], short: list[int],
              tag: str, queued: list[int] | None = None) -> dict:
    sp = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-s{i}" for i in range(len(streams))]
    for rid, p in zip(ids, streams, strict=True):
        engine.add_request(rid, p, sp)
    started: set[str] = set()
    one = SamplingParams(max_tokens=1, temperature=0.0)
    long_id, short_id, queued_id = f"{tag}-long", f"{tag}-short", f"{tag}-queued"
    try:
        while len(started) < len(ids):  # the streams' prefill, then each has a token
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        engine.step()  # one plain decode step
        engine.add_request(long_id, prompt, one)
        if queued:
            engine.add_request(queued_id, queued, one)
        t0 = last = time.perf_counter()
        gaps: list[float] = []
        tokens, first, ttft, short_at, short_ttft, k = 0, None, 0.0, 0.0, None, 0
        queued_ttft = None if queued else 0.0
        while first is None or short_ttft is None or queued_ttft is None:
            if k == 1:  # a short request arrives after the long prompt's first step
                engine.add_request(short_id, short, one)
                short_at = time.perf_counter()
            outs = engine.step()
            now, k = time.perf_counter(), k + 1
            got = [o for o in outs if o.request_id in ids and o.outputs[0].token_ids]
            if got and first is None:
                gaps.append(now - last)
                last = now
                tokens += sum(len(o.outputs[0].token_ids) for o in got)
            for o in outs:
                if o.request_id == long_id and o.outputs[0].token_ids and first is None:
                    first, ttft = o.outputs[0].token_ids[0], now - t0
                if o.request_id == short_id and o.outputs[0].token_ids:
                    short_ttft = now - short_at
                if o.request_id == queued_id and o.outputs[0].token_ids:
                    queued_ttft = now - t0
        return {"ttft": ttft, "max_gap": max(gaps, default=ttft),
                "mean_gap": statistics.mean(gaps) if gaps else ttft, "tokens": tokens,
                "short_ttft": short_ttft, "queued_ttft": queued_ttft, "first": first}  # fmt: skip
    finally:
        for rid in ids + [queued_id]:
            engine.abort_request(rid)


def offline_batch(bm, step_ms: float, requests: int, rounds: int) -> None:
    """The throughput workload's mixed requests (benchmarks/throughput.py: prompts 64-1024,
    outputs 32-256, all added at once) through an unpaced and a paced engine in turn: what pacing
    would cost an offline batch (why only `serve` turns it on)."""
    import time

    from qwen35.benchmarks.throughput import make_requests

    reqs = make_requests(requests, (64, 1024), (32, 256), bm.config.vocab_size, 0)
    longest = max(len(p) + o for p, o in reqs)
    engines = {ms: make_engine(bm, max_num_seqs=32, max_model_len=longest, max_decode_step_ms=ms)
               for ms in (0, step_ms)}  # fmt: skip
    secs: dict[float, list[float]] = {ms: [] for ms in engines}
    for r in range(rounds):
        for ms in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            e = engines[ms]
            for i, (p, o) in enumerate(reqs):
                e.add_request(f"{r}-{i}", p, SamplingParams(max_tokens=o, temperature=0.0,
                                                            ignore_eos=True))  # fmt: skip
            t0 = time.perf_counter()
            while e.has_unfinished_requests():
                e.step()
            secs[ms].append(time.perf_counter() - t0)
    generated = sum(o for _, o in reqs)
    for ms, v in secs.items():
        print(f"{requests} requests at once, max_decode_step_ms {ms:g}: "
              f"{generated / statistics.median(v):.1f} generated tok/s "
              f"(rounds {', '.join(f'{x:.1f}' for x in v)} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--step-ms", type=float, default=1000.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--short", type=int, default=32, help="the short request's prompt tokens")
    ap.add_argument("--queued", type=int, default=0, metavar="N",
                    help="a second prompt of N tokens arrives with the first, ahead of the short one")
    ap.add_argument("--offline", type=int, default=0, metavar="N",
                    help="instead: N mixed requests at once, unpaced vs paced (offline_batch)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bm = load_bench_model(BenchOptions(model=a.model, dtype=a.dtype, threads=a.threads))
    if a.offline:
        return offline_batch(bm, a.step_ms, a.offline, a.rounds)
    common = dict(max_num_seqs=a.streams + 3, max_model_len=max(a.prompt, a.queued) + 2200,
                  enable_prefix_caching=False)  # fmt: skip
    engines = {
        "whole chunks": make_engine(bm, max_decode_step_ms=0, **common),
        f"paced ({a.step_ms:.0f} ms)": make_engine(bm, max_decode_step_ms=a.step_ms, **common),
    }
    g, vocab = torch.Generator().manual_seed(3), bm.config.vocab_size
    streams = [torch.randint(2, vocab, (64,), generator=g).tolist() for _ in range(a.streams)]
    prompt = torch.randint(2, vocab, (a.prompt,), generator=g).tolist()
    short = torch.randint(2, vocab, (a.short,), generator=g).tolist()
    queued = torch.randint(2, vocab, (a.queued,), generator=g).tolist() if a.queued else None
    for name, e in engines.items():  # warm-up: kernels, and the pacer's first prefill rate
        one_round(e, streams[:1], prompt[:256], short, f"warm-{name}")
    rows: dict[str, list[dict]] = {n: [] for n in engines}
    names = list(engines)
    for r in range(a.rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            rows[n].append(one_round(engines[n], streams, prompt, short, f"{n}-{r}", queued))
            print(f"round {r} {n}: " + ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in rows[n][-1].items()), flush=True)  # fmt: skip
    also = f" with a {a.queued}-token one queued behind it" if a.queued else ""
    print(f"\n{a.model} ({bm.label}), {a.streams} streams decoding, a {a.prompt}-token prompt "
          f"arrives{also}, then a {a.short}-token one; medians of {a.rounds} rounds, "
          f"{a.threads} threads")  # fmt: skip
    print(f"{'engine':<18} {'TTFT s':>8} {'longest wait s':>15} {'mean wait s':>12} "
          f"{'stream tokens':>14} {'short TTFT s':>13}"
          + (f" {'queued TTFT s':>14}" if a.queued else ""))  # fmt: skip
    for n, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ("ttft", "max_gap", "mean_gap", "tokens", "short_ttft", "queued_ttft")}
        print(f"{n:<18} {med['ttft']:8.2f} {med['max_gap']:15.2f} {med['mean_gap']:12.2f} "
              f"{med['tokens']:14.0f} {med['short_ttft']:13.2f}"
              + (f" {med['queued_ttft']:14.2f}" if a.queued else ""))  # fmt: skip
    firsts = {x["first"] for rs in rows.values() for x in rs}
    print("the prompt's first token: " + ("equal in every round and engine" if len(firsts) == 1
                                          else f"DIFFERS: {sorted(firsts)} (bf16: the steps' "
                                          "row counts differ between the engines, and rows take the "
                                          "GEMV kernel or the GEMM by the row count, which round "
                                          "differently; the 64-token cuts keep bits)"))  # fmt: skip


if __name__ == "__main__":
    main()
