"""Paged decode attention on the CPU: our kernel (kernels/attention_cpu.cpp) vs its AVX2 path vs
the PyTorch path it replaces (gather the context's blocks, then SDPA: ops/attention.py
decode_attention), one query token per sequence, interleaved in one process.

    python bench/attention_cpu.py [--contexts 256,2048,8192] [--dtypes bf16,fp32,fp32:bf16]
                                  [--batch 1] [--rounds 7] [--threads 2] [--reps N] [--cold]
                                  [--baseline REV]

Shapes of a Qwen3.5 gated attention layer (8 query heads, 2 KV heads, head dim 256: the 0.8B / 2B
layer; 4B-397B have 2-4 KV heads with 4-16 query heads each), 16-token pages in shuffled order,
the output gate applied. Each cell: median microseconds a layer's call and the K/V bytes it read
per second (at batch 1 decode this is what a long context costs per attention layer and token).
"AVX2" is the path CPUs without AVX512 take (bf16 caches: without AVX512-BF16). --baseline REV
also runs both our paths as built from that git revision's kernel sources ("@base"; their
outputs are checked equal to this checkout's where the arithmetic did not change).
A dtype "fp32:bf16" is an fp32 model over bf16 caches (--kv-cache-dtype bf16), "bf16:fp8" a bf16
model over fp8 caches (--kv-cache-dtype fp8). --cold reads a
256 MiB buffer before every call, as a decode step's weights stream through the caches between
its attention layers: each call then reads its K/V from memory (by default the same K/V are read
call after call, and a short context's fit the L3).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from qwen35.benchmarks.common import kernel_sources_at
from qwen35.devices import cpu_flags
from qwen35.kernels import attention
from qwen35.ops.attention import decode_attention

DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16,
      "fp8": torch.float8_e4m3fn}  # fmt: skip


def _case(L: int, n: int, dtype, nh=8, nkv=2, hd=256, bs=16, seed=0, kv_dtype=None):
    g = torch.Generator().manual_seed(seed)
    per = -(-L // bs)
    kc = torch.randn(per * n + 1, bs, nkv, hd, generator=g).to(kv_dtype or dtype)
    vc = torch.randn(per * n + 1, bs, nkv, hd, generator=g).to(kv_dtype or dtype)
    tables = torch.randperm(per * n, generator=g).view(n, per).to(torch.int32)
    q = torch.randn(n, nh, hd, generator=g).to(dtype)
    gate = torch.randn(n, nh, hd, generator=g).to(dtype)
    lens = torch.full((n,), L, dtype=torch.int32)
    return q, kc, vc, tables, lens, gate, hd**-0.5


def _paths(mod, q, kc, vc, tab, lens, gate, scale, base=None) -> dict:
    L = int(lens.max())
    paths = {
        "ours": lambda: mod.paged_decode_attention(q, kc, vc, tab, lens, scale, gate),
        "ours AVX2": lambda: mod.paged_decode_attention(q, kc, vc, tab, lens, scale, gate, True),
        "gather+SDPA": lambda: (
            decode_attention(q, kc, vc, tab, lens.long(), L, scale)
            .to(q.dtype)
            .mul_(torch.sigmoid(gate))
        ),
    }
    if base is not None:
        paths["ours@base"] = lambda: base.paged_decode_attention(q, kc, vc, tab, lens, scale, gate)
        paths["ours AVX2@base"] = lambda: base.paged_decode_attention(
            q, kc, vc, tab, lens, scale, gate, True
        )
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="256,2048,8192")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="calls a cell (default: ~2M K/V rows)")
    ap.add_argument("--cold", action="store_true", help="K/V read from memory (see above)")
    ap.add_argument("--baseline", metavar="REV", help="also our kernel as of this git revision")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mod = attention.load()
    if mod is None:
        raise SystemExit("the CPU attention kernel is unavailable here (see the log)")
    base = None
    if args.baseline:
        tmp = tempfile.TemporaryDirectory()  # (removed at exit)
        base = attention.ATTENTION.from_folder(kernel_sources_at(args.baseline, tmp.name)).load()
        if base is None:
            raise SystemExit(f"the attention kernel of {args.baseline} did not build here")
    cold = "; K/V cold (read from memory)" if args.cold else ""
    print(f"{torch.get_num_threads()} threads; batch {args.batch}; median us a call (K/V GB/s){cold}")
    flush = torch.ones(64 << 20) if args.cold else None
    for name in args.dtypes.split(","):
        dtype, kv_dtype = (DT[n] for n in (name.split(":") * 2)[:2])
        for L in (int(c) for c in args.contexts.split(",")):
            case = _case(L, args.batch, dtype, kv_dtype=kv_dtype)
            paths = _paths(mod, *case, base=base)
            for ours in ("ours", "ours AVX2") if base is not None else ():
                diff = (paths[ours]().float() - paths[ours + "@base"]().float()).abs().max()
                print(f"  {ours} vs {ours}@base: max difference {diff.item():.3g}")
            times = {k: [] for k in paths}
            reps = args.reps or (3 if args.cold else max(3, 2_000_000 // (L * args.batch)))
            for f in paths.values():
                f()
            for r in range(args.rounds):
                for k, f in paths.items() if r % 2 == 0 else reversed(paths.items()):
                    if flush is not None:  # one call a sample, each after the flush
                        for _ in range(reps):
                            flush.sum()
                            t0 = time.perf_counter()
                            f()
                            times[k].append(time.perf_counter() - t0)
                        continue
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        f()
                    times[k].append((time.perf_counter() - t0) / reps)
            q, kc = case[0], case[1]
            kv = 2 * L * args.batch * kc.shape[2] * kc.shape[3] * kc.element_size()
            cells = []
            for k, v in times.items():
                m = statistics.median(v)
                cells.append(f"{k} {m * 1e6:8.1f} us ({kv / m / 1e9:5.1f})")
            fast = "AVX2"
            if mod.fast_path(dtype, q.shape[-1], False, kv_dtype):
                bf16 = dtype == torch.bfloat16 and kv_dtype in (dtype, DT["fp8"])
                fast = "AVX512-BF16" if bf16 and "avx512_bf16" in cpu_flags() else "AVX512"
            print(f"{name:9} L={L:6}  " + "  ".join(cells) + f"  [ours: {fast}]")


if __name__ == "__main__":
    main()
