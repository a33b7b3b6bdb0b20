"""One Gated DeltaNet layer's decode step: the compiled CPU kernel vs the PyTorch path.

    python bench/deltanet_decode.py [--batch 1 8 32] [--reps 15] [--threads N] [--dtype bf16]

Layer 0 of the Qwen3.5-0.8B config (random weights), N sequences in consecutive state slots,
one token each: `GatedDeltaNet.forward` with the fused kernel (kernels/gated_delta_cpu.cpp)
and with it switched off (`_decode_torch`), interleaved call by call on copies of the same
caches; medians of --reps. Prints a table and writes bench/results/deltanet_decode.json.
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
from qwen35.engine.forward_batch import ForwardBatch, StepPlan
from qwen35.engine.runtime import configure_cpu_runtime
from qwen35.layers import deltanet
from qwen35.loader import parse_dtype


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
    fused = deltanet._fused_decode
    rows = []
    for N in args.batch:
        batch = ForwardBatch(
            positions=torch.full((N,), 100),
            cu_seqlens=list(range(N + 1)),
            context_lens=[101] * N,
            slot_mapping=torch.arange(N),
            block_tables=torch.zeros(N, 1, dtype=torch.int32),
            state_slots=torch.arange(N),
            has_initial_state=[True] * N,
            logits_indices=torch.arange(N),
        )
        plan = StepPlan.build(batch, N)
        conv = torch.randn(N, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1).to(dtype)
        rec = torch.randn(N, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim) * 0.01  # fmt: skip
        x = torch.randn(N, cfg.hidden_size).to(dtype)
        times = {"kernel": [], "torch": []}
        with torch.inference_mode():
            for rep in range(args.reps + 1):
                for name, f in (("kernel", fused), ("torch", lambda rec_cache: None)):
                    deltanet._fused_decode = f
                    c, r = conv.clone(), rec.clone()
                    t0 = time.perf_counter()
                    layer(x, plan, c, r)
                    if rep:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
        deltanet._fused_decode = fused
        k, t = (statistics.median(times[n]) * 1e3 for n in ("kernel", "torch"))
        rows.append({"batch": N, "kernel_ms": k, "torch_ms": t, "speedup": t / k})
    print(f"DeltaNet decode step, one layer of Qwen3.5-0.8B ({args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.reps})")  # fmt: skip
    print(f"{'batch':>6} {'kernel ms':>10} {'torch ms':>10} {'torch / kernel':>15}")
    for r in rows:
        print(
            f"{r['batch']:>6} {r['kernel_ms']:>10.3f} {r['torch_ms']:>10.3f} {r['speedup']:>14.2f}x"
        )
    out = Path(__file__).parent / "results" / "deltanet_decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(),
                               "reps": args.reps, "rows": rows}, indent=2))  # fmt: skip
    tmp.replace(out)


if __name__ == "__main__":
    main()
