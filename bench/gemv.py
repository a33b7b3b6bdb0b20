"""Decode GEMVs on the CPU: our kernels (qwen35/kernels/gemv_cpu.cpp) vs torch's own, per format.

Each shape is a Qwen3.5-0.8B projection; enough copies of the weight are cycled that they never
sit in the caches (>= 256 MB in all), as in a real decode step: each path walks through all copies
before the next path runs (paths that ran on the same copy back to back found it in the L3). Paths run interleaved, `--rounds`
times, and each cell is the median ms per call plus the weight bytes per second it streamed.

    python bench/gemv.py [--rows 1,4,16] [--threads 2] [--rounds 5] [--formats fp32,bf16,int8,fp8,int4]
    python bench/gemv.py --formats int4 --shapes "mlp gate_up,mlp down,deltanet in_proj,out_proj"
    python bench/gemv.py --baseline 4e8b8e6 --rows 1,2,4,8  # also our kernels as of a commit
    python bench/gemv.py --formats bf16 --rows 8,16 --shapes "2B mlp gate_up,2B mlp down"  # MORE_SHAPES

--baseline REV: the kernel sources and headers of that git revision are built beside the
checkout's (`Native.from_folder`) and each of our paths also runs from them ("<path>@base",
interleaved like the rest); the last columns give ours / base speed per path.

fp32: torch's F.linear vs ours (FMA; above 4 rows on AVX512 CPUs 16 lanes, two weight rows a
pass) vs ours-avx2 (the AVX2 path any row count). bf16: torch (torch.mv at 1 row, F.linear above) vs ours (AVX512-BF16 where the CPU has it) vs
ours forced onto the AVX2 path (what a CPU without AVX512 runs). int8: torch's
`_weight_int8pack_mm` vs ours. FP8: the AVX2/F16C kernel (fp8_cpu.cpp; fp32 rows take it on
AVX512 CPUs too, there built with VL's registers; avx2-only: its AVX2 build) vs ours (AVX512-VBMI
byte tables) vs ours-cvt (AVX512 without VBMI + BF16: fp16 bits converted).
int4 (groups of 128, --int4-group for others; torch's packed layout; not for lm_head, which int4 keeps in int6: bench/int6_head.py): torch's
`_weight_int4pack_mm_for_cpu` vs ours (int4_cpu.cpp: AVX512-VBMI + BF16) vs ours-avx2, and both with
8-bit activations (x8: ours-x8 the AVX512-VNNI path, ours-avx2-x8); with
--int4-fp32 also both on fp32 rows. GB/s counts the packed weight bytes (0.5 per weight).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from qwen35.benchmarks.common import kernel_sources_at
from qwen35.kernels import fp8 as fp8_kernel
from qwen35.kernels import gemv
from qwen35.quant import formats, matmul

SHAPES = {  # name: (out, in) of Qwen3.5-0.8B's decode matrices
    "mlp gate_up": (7168, 1024),
    "mlp down": (1024, 3584),
    "lm_head": (248320, 1024),
    "deltanet in_proj": (8192, 1024),  # qkv + z (8224 with the bf16 b / a rows, not int4)
    "out_proj": (1024, 2048),
}
MORE_SHAPES = {  # larger models' (--shapes names them; not run by default)
    "2B mlp gate_up": (12288, 2048),
    "2B mlp down": (2048, 6144),
    "2B lm_head": (248320, 2048),
    "9B mlp gate_up": (24576, 4096),
    "9B mlp down": (4096, 12288),
}
BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "fp8": 1, "int4": 0.5}
MIN_BYTES = 256 << 20


def _paths(x, w, w32, q8, s8, f8, fs8, mod, fmod) -> dict:
    rows = x.shape[0]
    bf16_torch = (lambda: torch.mv(w, x[0])) if rows == 1 else (lambda: F.linear(x, w))
    paths = {}
    if w32 is not None:
        x32 = x.float()
        paths["fp32 torch"] = lambda: F.linear(x32, w32)
        paths["fp32 ours"] = lambda: mod.linear_fp32(x32, w32)
        paths["fp32 ours-avx2"] = lambda: mod.linear_fp32(x32, w32, True)
    paths |= {
        "bf16 torch": bf16_torch,
        "bf16 ours": lambda: mod.linear_bf16(x, w),
        "bf16 ours-avx2": lambda: mod.linear_bf16(x, w, True),
        "int8 torch": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
        "int8 ours": lambda: mod.linear_int8(x, q8, s8),
        "int8 ours-fma": lambda: mod.linear_int8(x, q8, s8, True),
    }
    if fmod is not None:
        paths["fp8 avx2"] = lambda: fmod.fp8_linear(x, f8, fs8, 128, 128)
        if "avx2_only" in (fmod.fp8_linear.__doc__ or ""):  # (not in builds before 2026-12-02)
            paths["fp8 avx2-only"] = lambda: fmod.fp8_linear(x, f8, fs8, 128, 128, avx2_only=True)
    if mod.fp8_supported(128):
        paths["fp8 ours"] = lambda: mod.linear_fp8(x, f8, fs8, 128, 128)
    if mod.fp8_cvt_supported():
        paths["fp8 ours-cvt"] = lambda: mod.linear_fp8(x, f8, fs8, 128, 128, True)
    return paths


def _int4_paths(x, p4, sz4, sz4f, mod4, fp32: bool, g: int = 128) -> dict:
    n, xf = p4.shape[0], x.float()
    int4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    paths = {"int4 torch": lambda: int4(x, p4, g, sz4)}
    if mod4 is not None:
        if mod4.int4_fast_supported():
            paths["int4 ours"] = lambda: mod4.linear_int4(x, p4, sz4, g, n)
        paths["int4 ours-avx2"] = lambda: mod4.linear_int4(x, p4, sz4, g, n, True)
        if hasattr(mod4, "int4_vnni_supported"):  # 8-bit activations (a --baseline may lack them)
            if mod4.int4_vnni_supported():
                paths["int4 ours-x8"] = lambda: mod4.linear_int4(x, p4, sz4, g, n, x8=True)
            paths["int4 ours-avx2-x8"] = lambda: mod4.linear_int4(x, p4, sz4, g, n, True, True)
    if fp32:
        paths["int4 torch f32"] = lambda: int4(xf, p4, g, sz4f)
        if mod4 is not None:
            paths["int4 ours f32"] = lambda: mod4.linear_int4(xf, p4, sz4f, g, n)
    return paths


def _baseline(rev: str, folder: str):
    """(gemv, fp8, int4 modules) built from git revision `rev`'s kernel sources and headers."""
    kernel_sources_at(rev, folder)
    return tuple(n.from_folder(folder).load() for n in (gemv.GEMV, fp8_kernel.FP8, gemv.INT4))


def _with_base(paths: dict, base: dict) -> dict:
    """paths plus base's runs of our own paths (not torch's), labelled "<path>@base"."""
    return paths | {f"{lb}@base": fn for lb, fn in base.items() if "torch" not in lb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated names (also: {', '.join(MORE_SHAPES)})")
    ap.add_argument("--formats", default="fp32,bf16,int8,fp8,int4", help="comma-separated")
    ap.add_argument("--int4-fp32", action="store_true", help="also int4 on fp32 rows")
    ap.add_argument("--int4-group", type=int, default=128,
                    help="int4 group size (32: a GGUF file's 4-bit tensors kept, --gguf-int4 keep)")
    ap.add_argument("--baseline", metavar="REV", help="also our kernels as of this git revision")
    a = ap.parse_args()
    fmts = set(a.formats.split(","))
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    mod, fmod, mod4 = gemv.load(), fp8_kernel.load(), gemv.load_int4()
    if mod is None:
        raise SystemExit("the gemv kernel is not available here (no compiler or no AVX2)")
    print(f"{torch.get_num_threads()} threads, fast paths: {mod.isa()}")
    base = None
    if a.baseline:
        tmp = tempfile.TemporaryDirectory()  # (removed at exit)
        base = _baseline(a.baseline, tmp.name)
        if base[0] is None:
            raise SystemExit(f"the kernels of {a.baseline} did not build here")
    for name in a.shapes.split(","):
        n, k = {**SHAPES, **MORE_SHAPES}[name]
        copies = max(1, -(-MIN_BYTES // (n * k * 2)))
        int4_only = fmts <= {"int4"}
        if int4_only:  # cycle 4x as many copies: the packed weight is a quarter of bf16's
            copies *= 4
        if "fp32" in fmts:  # fp32 weights are twice bf16's bytes: as many copies again
            copies *= 2
        ws, w32s, q8s, f8s, i4s = [], [], [], [], []
        for _ in range(copies):
            w = (torch.randn(n, k) * 0.02).bfloat16()
            q8s.append(formats.quantize_int8_rows(w, torch.bfloat16) if "int8" in fmts else None)
            f8 = formats.quantize_fp8_blocks(w) if "fp8" in fmts else None
            f8s.append((f8[0], f8[1].float()) if f8 else (None, None))
            int4 = "int4" in fmts and n % 64 == 0 and name != "lm_head"  # lm_head: int6
            i4s.append(_int4(w, a.int4_fp32, a.int4_group) if int4 else None)
            ws.append(None if int4_only else w)
            w32s.append(w.float() if "fp32" in fmts else None)
        labels = None
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, k).bfloat16()
            times: dict[str, list[float]] = {}
            per_copy = []
            for c in range(copies):
                (q8, s8), (f8, fs8) = q8s[c] or (None, None), f8s[c]
                paths = {}
                if ws[c] is not None:
                    paths = _paths(x, ws[c], w32s[c], q8, s8, f8, fs8, mod, fmod)
                    if base:
                        paths = _with_base(paths, _paths(x, ws[c], w32s[c], q8, s8, f8, fs8,
                                                         base[0], base[1]))  # fmt: skip
                if i4s[c] is not None:
                    paths.update(_int4_paths(x, *i4s[c], mod4, a.int4_fp32, a.int4_group))
                    if base:
                        paths = _with_base(paths, _int4_paths(x, *i4s[c], base[2], a.int4_fp32,
                                                                a.int4_group))
                per_copy.append({lb: fn for lb, fn in paths.items() if lb.split()[0] in fmts})
            for _ in range(a.rounds):  # interleaved: every path once per round
                for label in per_copy[0]:  # each path walks all copies: none is still in cache
                    for paths in per_copy:
                        t0 = time.perf_counter()
                        paths[label]()
                        times.setdefault(label, []).append(time.perf_counter() - t0)
            med = {lb: statistics.median(v) * 1e3 for lb, v in times.items()}
            vs_base = [lb for lb in med if f"{lb}@base" in med]  # ours / base speed
            if labels is None:
                labels = list(times)
                print(f"\n{name} [{n} x {k}]: ms per call (GB/s of weight read)")
                print(f"{'rows':>4} " + " ".join(f"{lb:>{max(15, len(lb))}}" for lb in labels)
                      + "".join(f" {lb + '/base':>{max(10, len(lb) + 5)}}" for lb in vs_base))
            cells = []
            for label in labels:
                ms = med[label]
                cell = f"{ms:7.3f} ({n * k * BYTES[label.split()[0]] / ms / 1e6:4.1f})"
                cells.append(cell.rjust(max(15, len(label))))
            for lb in vs_base:
                cells.append(f"{med[lb + '@base'] / med[lb]:.2f}x".rjust(max(10, len(lb) + 5)))
            print(f"{rows:>4} " + " ".join(cells))


def _int4(w: torch.Tensor, fp32: bool, group: int = 128):
    """(packed, scales_and_zeros bf16, the same in fp32 or None), groups of `group`."""
    q, sz = formats.quantize_int4_groups(w, group, torch.bfloat16)
    return matmul.pack_int4(q), sz, sz.float() if fp32 else None


if __name__ == "__main__":
    main()
