"""Time to first token after a restart: a long shared prefix (a system prompt, an agent's tools and
history) computed again, taken from `--prefix-cache-dir`'s files, or from memory, in one run.

    python bench/prefix_store.py [--model Qwen3.5-0.8B] [--prefix 2000 8000] [--question 64]
                                 [--rounds 3] [--dtype auto] [--threads N] [--cold]

Two engines on one set of weights: `plain` (no folder) and `disk` (a folder in a temporary
directory). Each round, for each prefix length, four prompts of the prefix + a new 64-token
question, each one request alone (max_tokens 1, so its time is the time to its first token):
  compute       plain, its memory cache emptied first: the whole prompt computed (a restart today)
  compute+save  disk, a prefix never seen: the whole prompt computed, its segments queued for
                the writer (the engine thread's copy is in the time; the writer thread's disk
                time is not: it is waited for after, and printed apart)
  disk          disk, its memory cache emptied first (what a restart leaves): the prefix read from
                the folder (the files sit in the OS page cache: a warm read; --cold drops the page
                cache first, root only, so they come from the disk, as after a reboot)
  memory        disk, right after `disk`, another question: the prefix from memory (the best case)
The folder's segments of each prefix come from a warm-up of two questions on it in the disk
engine: the first leaves segments every ~1,024 tokens and at its prompt's end, the second (a memory
hit) makes the prefix's end a branch point, whose segment every later question then starts from,
as on a server that has seen the system prompt twice. The modes' order rotates each round;
medians. Random weights (a timing bench).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time


def drop_page_cache() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(f"--cold drops the OS page cache, which needs root on Linux ({e})") from e


def ttft(engine, rid: str, prompt: list[int]) -> float:
    from qwen35.request import SamplingParams

    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--prefix", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cold", action="store_true",
                    help="drop the OS page cache before each read from the folder (needs root): "
                         "the files come from the disk itself")  # fmt: skip
    args = ap.parse_args(argv)
    if args.cold:
        drop_page_cache()  # (fails here, before anything loads, without the rights)
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.engine import prefix_store
    from qwen35.engine.runtime import configure_cpu_runtime

    configure_cpu_runtime(args.threads)
    bm = load_bench_model(BenchOptions(model=args.model, dtype=args.dtype))
    folder = tempfile.mkdtemp(prefix="qwen35-prefix-store-")
    kw = dict(max_model_len=max(args.prefix) + args.question + 16, max_num_seqs=4)
    plain = make_engine(bm, **kw)
    disk = make_engine(bm, prefix_cache_dir=folder, prefix_cache_dir_size="64GiB", **kw)
    reads = []
    real_import = prefix_store.import_prefix

    def timed_import(*a):
        t0 = time.perf_counter()
        n = real_import(*a)
        if n:
            reads.append(time.perf_counter() - t0)
        return n

    prefix_store.import_prefix = timed_import
    try:
        run(args, bm, plain, disk, timed=reads)
    finally:
        prefix_store.import_prefix = real_import
        disk.shutdown()


def run(args, bm, plain, disk, timed: list[float]) -> None:
    store, reads = disk.prefix_store, timed
    rng = random.Random(0)
    vocab = bm.model.config.vocab_size

    def toks(n):
        return [rng.randrange(min(1000, vocab // 2), min(vocab, 100_000)) for _ in range(n)]

    prefixes = {n: toks(n) for n in args.prefix}
    ids = iter(range(1 << 30))
    size = {}
    for n, s in prefixes.items():  # warm-up: the shared prefixes written, everything compiled
        for _ in range(2):  # the second makes the prefix's end a branch point: a segment ends there
            ttft(disk, f"w{next(ids)}", s + toks(args.question))
        ttft(plain, f"w{next(ids)}", s + toks(args.question))
        store.flush()
        size[n] = sum(p.stat().st_size for p in store.dir.glob("*.safetensors")) - sum(
            size.values()
        )
    times = {(n, m): [] for n in prefixes for m in ("compute", "compute+save", "disk", "memory")}
    writes, read_ms = {n: [] for n in prefixes}, {n: [] for n in prefixes}
    for r in range(args.rounds):
        for n, s in prefixes.items():
            modes = ["compute", "compute+save", "disk"]
            modes = modes[r % 3 :] + modes[: r % 3]
            for m in modes:
                if m == "compute":
                    plain.scheduler.reset_prefix_cache()
                    times[n, m].append(ttft(plain, f"c{next(ids)}", s + toks(args.question)))
                elif m == "compute+save":
                    times[n, m].append(ttft(disk, f"s{next(ids)}", toks(n + args.question)))
                    t0 = time.perf_counter()
                    store.flush()
                    writes[n].append(time.perf_counter() - t0)
                else:
                    disk.scheduler.reset_prefix_cache()
                    if args.cold:
                        drop_page_cache()
                    before = len(reads)
                    times[n, m].append(ttft(disk, f"d{next(ids)}", s + toks(args.question)))
                    assert len(reads) == before + 1, "the disk mode did not read the folder"
                    read_ms[n].append(reads[-1])
                    times[n, "memory"].append(ttft(disk, f"m{next(ids)}", s + toks(args.question)))
    stats = disk.get_stats()
    print(f"{args.model}, {str(bm.dtype).removeprefix('torch.')} ({bm.quantization or 'weights as stored'}), question "
          f"{args.question} tokens, {args.rounds} rounds (medians, seconds to the first token)"
          f"{'; disk reads cold (page cache dropped)' if args.cold else ''}")
    print(f"{'prefix':>7} {'compute':>9} {'+save':>9} {'disk':>9} {'memory':>9} "
          f"{'compute/disk':>13} {'read+copy':>10} {'write (bg)':>11} {'files MB':>9}")  # fmt: skip
    for n in prefixes:
        med = {m: statistics.median(times[n, m]) for m in ("compute", "compute+save", "disk",
                                                            "memory")}  # fmt: skip
        print(f"{n:>7} {med['compute']:>9.3f} {med['compute+save']:>9.3f} {med['disk']:>9.3f} "
              f"{med['memory']:>9.3f} {med['compute'] / med['disk']:>12.2f}x "
              f"{statistics.median(read_ms[n]) * 1e3:>8.1f}ms "
              f"{statistics.median(writes[n]) * 1e3:>9.1f}ms {size[n] / 1e6:>9.1f}")
        per = [f"{c / d:.2f}" for c, d in zip(times[n, "compute"], times[n, "disk"], strict=True)]
        print(f"{'':>7} compute/disk per round: {', '.join(per)}")
    print(f"disk hits {stats['prefix_cache_disk_hits']}, saves {stats['prefix_cache_disk_saves']}, "
          f"errors {stats['prefix_cache_disk_read_errors']} / "
          f"{stats['prefix_cache_disk_write_errors']}; folder {store.dir}")


if __name__ == "__main__":
    main()
