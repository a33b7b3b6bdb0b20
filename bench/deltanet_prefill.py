"""The chunked gated delta rule on the CPU: our kernel (kernels/gated_delta_cpu.cpp
`deltanet_chunk`, one value head a task, chunk by chunk in L1 / L2) vs its PyTorch twin
(ops/gated_delta.py chunk_gated_delta_rule: batched matmuls over the whole prompt), interleaved
in one process.

    python bench/deltanet_prefill.py [--tokens 512,2048,8192] [--heads 16,16] [--head-dim 128]
                                     [--dtype bf16|fp32] [--threads 2] [--rounds 5]
    python bench/deltanet_prefill.py --engine 2048,8192 [--dtype bf16|fp32] [--model NAME]

One DeltaNet layer's rule for a prompt of each length (the Qwen3.5-0.8B shape by default: 16 key
and 16 value heads of 128; the 9B's: --heads 16,32): median ms per call of each path, the AVX2
path of the kernel too (what a CPU without AVX-512 runs), and the largest difference between the
outputs. `--engine`: whole prompts prefilled by a --dtype engine (random weights, steps of
--chunk tokens) with the kernel and with the twin, alternating round by round: tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwen35 import kernels
from qwen35.ops import deltanet as ops
from qwen35.ops.gated_delta import chunk_gated_delta_rule

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def one_layer(mod, T: int, hk: int, hv: int, hd: int, dtype, rounds: int) -> None:
    g = torch.Generator().manual_seed(T)
    width = 2 * hk * hd + hv * hd
    u = torch.randn(T, width, generator=g).to(dtype)  # the conv's output, split as the layer does
    q = u[:, : hk * hd].unflatten(-1, (hk, hd))
    k = u[:, hk * hd : 2 * hk * hd].unflatten(-1, (hk, hd))
    v = u[:, 2 * hk * hd :].unflatten(-1, (hv, hd))
    log_decay = -torch.rand(T, hv, generator=g) * 2
    beta = torch.rand(T, hv, generator=g).to(dtype)
    outs = {name: torch.empty(T, hv, hd, dtype=dtype) for name in ("twin", "kernel", "avx2")}

    def twin():
        chunk_gated_delta_rule(q[None], k[None], v[None], log_decay[None], beta[None], None,
                               use_qk_l2norm=True, out=outs["twin"][None])  # fmt: skip

    def native(name, avx2_only):
        return lambda: ops.chunk_native(mod, q, k, v, log_decay, beta, None, outs[name], [],
                                        avx2_only=avx2_only)  # fmt: skip

    paths = {"twin": twin, "kernel": native("kernel", False), "avx2": native("avx2", True)}
    t: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e3 for n, v in t.items()}
    diff = (outs["kernel"].float() - outs["twin"].float()).abs().max().item()
    print(f"T={T:6d} heads {hk}/{hv} x {hd} {str(dtype)[6:]}: twin {med['twin']:8.1f} ms, kernel "
          f"{med['kernel']:7.1f} ms ({med['twin'] / med['kernel']:.2f}x), kernel's AVX2 path "
          f"{med['avx2']:7.1f} ms ({med['twin'] / med['avx2']:.2f}x); max |diff| {diff:.1e}",
          flush=True)  # fmt: skip


def engine_prefill(lengths: list[int], chunk: int, rounds: int, dtype: str, model: str) -> None:
    from qwen35.benchmarks.common import BenchOptions, prefill_ab

    real = ops.chunk_kernel
    modes = {"twin": lambda: setattr(ops, "chunk_kernel", lambda *a: None),
             "kernel": lambda: setattr(ops, "chunk_kernel", real)}  # fmt: skip
    prefill_ab(BenchOptions(dtype=dtype, model=model), lengths, chunk, rounds, modes,
               f"{dtype} {model}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--heads", default="16,16", help="key heads, value heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine", default="", help="whole-prompt lengths through the engine")
    ap.add_argument("--chunk", type=int, default=2048, help="--engine: tokens a prefill step")
    ap.add_argument("--model", default="Qwen3.5-0.8B", help="--engine: catalog model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.engine:
        engine_prefill([int(n) for n in a.engine.split(",")], a.chunk, a.rounds, a.dtype, a.model)
        return
    mod = kernels.load()
    if mod is None:
        raise SystemExit("the DeltaNet kernel does not load here (no compiler / AVX2, or "
                         "QWEN35_NO_KERNELS is set)")  # fmt: skip
    hk, hv = (int(x) for x in a.heads.split(","))
    for T in (int(x) for x in a.tokens.split(",")):
        one_layer(mod, T, hk, hv, a.head_dim, DTYPES[a.dtype], a.rounds)


if __name__ == "__main__":
    main()
