"""One Gated DeltaNet layer's decode step: the compiled CPU kernel vs the PyTorch path.

    python bench/deltanet_decode.py [--batch 1 8 32] [--reps 15] [--threads N] [--dtype bf16]

Layer 0 of the Qwen3.5-0.8B config (random weights), N sequences in consecutive state slots,
one token each: `GatedDeltaNet.forward` with the fused kernel (kernels/gated_delta_cpu.cpp)
and through the reference backend (plain PyTorch, ops/deltanet.py), interleaved call by call
on copies of the same caches; medians of --reps. Then the kernel alone at batch 1 as a decode
step meets it (18 layers' states, caches flushed by a 64 MB pass before each step): its AVX-512
state passes vs its AVX2 ones (`avx2_only`, what CPUs without AVX-512 run), interleaved.
Prints tables and writes bench/results/deltanet_decode.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qwen35 import kernels
from qwen35.catalog import load_model_config
from qwen35.engine.forward_batch import ForwardBatch
from qwen35.engine.runtime import configure_cpu_runtime
from qwen35.layers import deltanet
from qwen35.loader import parse_dtype
from qwen35.ops.backend import reference_backend, select_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    configure_cpu_runtime(args.threads)  # the engine's CPU settings (denormals, heap, threads)
    if kernels.load() is None:
        raise SystemExit(
            "the CPU kernel is not available here (see the warning); nothing to compare"
        )
    dtype = parse_dtype(args.dtype)
    cfg = load_model_config("Qwen3.5-0.8B")
    layer = deltanet.GatedDeltaNet(cfg, dtype)
    g = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    layer.pack()
    rows = []
    backends = {"kernel": select_backend("cpu"), "torch": reference_backend("cpu")}
    for N in args.batch:
        batches = {
            name: ForwardBatch.build(
                positions=[100] * N,
                cu_seqlens=list(range(N + 1)),
                context_lens=[101] * N,
                slot_mapping=range(N),
                block_tables=[[0]] * N,
                state_slots=range(N),
                has_initial_state=[True] * N,
                logits_indices=range(N),
                backend=be,
            )
            for name, be in backends.items()
        }
        conv = torch.randn(N, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1).to(dtype)
        rec = torch.randn(N, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim) * 0.01  # fmt: skip
        x = torch.randn(N, cfg.hidden_size).to(dtype)
        times = {"kernel": [], "torch": []}
        with torch.inference_mode():
            for rep in range(args.reps + 1):
                for name, batch in batches.items():
                    c, r = conv.clone(), rec.clone()
                    t0 = time.perf_counter()
                    layer(x, batch, c, r)
                    if rep:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
        k, t = (statistics.median(times[n]) * 1e3 for n in ("kernel", "torch"))
        rows.append({"batch": N, "kernel_ms": k, "torch_ms": t, "speedup": t / k})
    print(f"DeltaNet decode step, one layer of Qwen3.5-0.8B ({args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.reps})")  # fmt: skip
    print(f"{'batch':>6} {'kernel ms':>10} {'torch ms':>10} {'torch / kernel':>15}")
    for r in rows:
        print(
            f"{r['batch']:>6} {r['kernel_ms']:>10.3f} {r['torch_ms']:>10.3f} {r['speedup']:>14.2f}x"
        )
    alone = kernel_alone(cfg, dtype, args.reps)
    print("kernel alone, 18 layers at batch 1, ms per step: "
          + ", ".join(f"{k} {v:.3f}" for k, v in alone.items()))  # fmt: skip
    out = Path(__file__).parent / "results" / "deltanet_decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(),
                               "reps": args.reps, "rows": rows, "kernel_alone_ms": alone},
                              indent=2))  # fmt: skip
    tmp.replace(out)


def kernel_alone(cfg, dtype, reps: int, layers: int = 18) -> dict:
    """Median ms of `layers` kernel calls (one per layer's inputs and states), per ISA path."""
    mod = kernels.load()
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, C = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_dim
    K = cfg.linear_conv_kernel_dim
    ins = [
        (
            torch.randn(1, C).to(dtype),
            torch.randn(1, C, K - 1).to(dtype),
            (torch.randn(C, K) * 0.3).to(dtype),
            -torch.rand(1, nv),
            torch.rand(1, nv).to(dtype),
            torch.randn(1, nv, dk, dv) * 0.01,
        )
        for _ in range(layers)
    ]
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    times = {"avx512": [], "avx2": []}
    for rep in range(reps + 1):
        for name in times:
            flush.add_(1)  # the weights streamed between two uses of a layer evict its states
            t0 = time.perf_counter()
            for qkv, conv, w, g, beta, S in ins:
                mod.deltanet_decode(qkv, conv, w, g, beta, S, nk, avx2_only=name == "avx2")
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


if __name__ == "__main__":
    main()
