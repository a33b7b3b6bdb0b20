"""Decode GEMVs on the CPU: our kernels (qwen35/kernels/gemv_cpu.cpp) vs torch's own, per format.

Each shape is a Qwen3.5-0.8B projection; enough copies of the weight are cycled that they never
sit in the caches (>= 256 MB in all), as in a real decode step. Paths run interleaved, `--rounds`
times, and each cell is the median ms per call plus the weight bytes per second it streamed.

    python bench/gemv.py [--rows 1,4,16] [--threads 2] [--rounds 5]

bf16: torch (torch.mv at 1 row, F.linear above) vs ours (AVX512-BF16 where the CPU has it) vs
ours forced onto the AVX2 path (what a CPU without AVX512 runs). int8: torch's
`_weight_int8pack_mm` vs ours. FP8: the AVX2/F16C kernel (fp8_cpu.cpp) vs ours (AVX512-VBMI).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qwen35.kernels import fp8 as fp8_kernel
from qwen35.kernels import gemv
from qwen35.quant import formats

SHAPES = {  # name: (out, in) of Qwen3.5-0.8B's decode matrices
    "mlp gate_up": (7168, 1024),
    "mlp down": (1024, 3584),
    "lm_head": (248320, 1024),
}
MIN_BYTES = 256 << 20


def _paths(x, w, q8, s8, f8, fs8, mod, fmod) -> dict:
    rows = x.shape[0]
    bf16_torch = (lambda: torch.mv(w, x[0])) if rows == 1 else (lambda: F.linear(x, w))
    paths = {
        "bf16 torch": bf16_torch,
        "bf16 ours": lambda: mod.linear_bf16(x, w),
        "bf16 ours-avx2": lambda: mod.linear_bf16(x, w, True),
        "int8 torch": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
        "int8 ours": lambda: mod.linear_int8(x, q8, s8),
        "int8 ours-fma": lambda: mod.linear_int8(x, q8, s8, True),
    }
    if fmod is not None:
        paths["fp8 avx2"] = lambda: fmod.fp8_linear(x, f8, fs8, 128, 128)
    if mod.fp8_supported(128):
        paths["fp8 ours"] = lambda: mod.linear_fp8(x, f8, fs8, 128, 128)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    mod, fmod = gemv.load(), fp8_kernel.load()
    if mod is None:
        raise SystemExit("the gemv kernel is not available here (no compiler or no AVX2)")
    print(f"{torch.get_num_threads()} threads, fast paths: {mod.isa()}")
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(1, -(-MIN_BYTES // (n * k * 2)))
        ws = [(torch.randn(n, k) * 0.02).bfloat16() for _ in range(copies)]
        q8s = [formats.quantize_int8_rows(w, torch.bfloat16) for w in ws]
        f8s = [formats.quantize_fp8_blocks(w) for w in ws]
        labels = None
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, k).bfloat16()
            times: dict[str, list[float]] = {}
            for _ in range(a.rounds):  # interleaved: every path once per round, per copy
                for c in range(copies):
                    (q8, s8), (f8, fs8) = q8s[c], f8s[c]
                    for label, fn in _paths(x, ws[c], q8, s8, f8, fs8.float(), mod, fmod).items():
                        t0 = time.perf_counter()
                        fn()
                        times.setdefault(label, []).append(time.perf_counter() - t0)
            if labels is None:
                labels = list(times)
                print(f"\n{name} [{n} x {k}]: ms per call (GB/s of weight read)")
                print(f"{'rows':>4} " + " ".join(f"{lb:>15}" for lb in labels))
            cells = []
            for label in labels:
                ms = statistics.median(times[label]) * 1e3
                nbytes = n * k * (2 if label.startswith("bf16") else 1)
                cells.append(f"{ms:7.3f} ({nbytes / ms / 1e6:4.1f})")
            print(f"{rows:>4} " + " ".join(f"{c:>15}" for c in cells))

if __name__ == "__main__":
    main()
