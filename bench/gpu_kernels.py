"""Our GPU decode kernels against the paths they replace, at the catalog models' shapes (GPU).

    python bench/gpu_kernels.py [--only moe,fp8,int,attention,deltanet] [--out FILE.json]
    TRITON_INTERPRET=1 PYTHONPATH=src:tests python bench/gpu_kernels.py --dry-run  # CPU check

Each row: microseconds per call (triton.testing.do_bench: warm-up, then the median of repeated
calls, the L2 cache flushed between them) and the GB/s of the bytes the call has to read, side
by side with the path it replaced, in one run:
- moe: the Triton MoE block (kernels/triton_moe.py; rows per program BN x reduction chunk BK:
  4x128 the default, 8x128, 16x128, 4x256; the router and shared expert's inputs packed in
  one matmul (SparseMoE.pack, the loader's default) or apart) vs the grouped-GEMM path
  (router softmax/top-k, sort by expert, two torch._grouped_mm, the shared expert's MLP), bf16
  at the 35B-A3B and 122B-A10B shapes, 1 / 4 / 16 tokens; FP8 experts (e4m3, 128x128
  scales): the Triton MoE at 1 / 16 tokens, and at 16-1024 the grouped GEMM over the sorted
  pairs vs the per-expert loop of block-FP8 GEMMs it replaced.
- fp8: the weight-only FP8 GEMV (quant/fp8_gpu.py; 32 / 64 / 128 weight rows per program) vs
  activation quantization + the blockwise GEMM (torch._scaled_mm where it runs, and the Triton
  block kernel), 1 / 16 rows, 27B projections.
- int: one weight's decode-sized product in BF16 (cuBLAS), FP8 (the GEMV) and int4 groups of
  128 / 32 (kernels/triton_int.py), 27B projections, 1 / 16 rows; 64-4096 rows: the int4 GEMM
  kernel vs dequantising + cuBLAS vs BF16 cuBLAS (where int_gpu.DENSE_GEMM_MAX_ROWS belongs);
  the int4 MoE experts at the 35B-A3B shapes, 1 / 4 / 16 tokens (pairs kernels), 16-4096
  (the sorted grouped GEMM vs the pairs kernels up to 64, vs every expert dequantised +
  torch._grouped_mm from 64).
- attention: paged decode attention at 1K / 8K / 32K tokens, batch 1 / 32: split-K (the
  default) vs one program per (sequence, KV head), 9B heads (16 query, 4 KV, head_dim 256);
  and a 2,048-token prefill chunk after 2K / 14K / 30K cached tokens (chunked prefill of a long
  prompt): the Triton paged kernel vs gather + SDPA with a bottom-right causal bias vs with a
  boolean mask (`tflops` per row).
- deltanet: a decode step of one DeltaNet layer between its projections at the 9B shapes: conv +
  recurrent step with its gates + gated norm (3 launches) vs the gates op by op first.
--dry-run (CPU, Triton's interpreter, tiny sizes) calls every path once and times nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DRY = "--dry-run" in sys.argv


def bench(fn, *args, **kwargs) -> float | None:
    """Microseconds per call of fn(*args, **kwargs) (None in a dry run: called once)."""
    if DRY:
        fn(*args, **kwargs)
        return None
    import triton.testing

    call = lambda: fn(*args, **kwargs)  # noqa: E731
    return triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median") * 1e3


def row(table: list, name: str, us: float | None, nbytes: int, **kw) -> None:
    gbs = nbytes / (us * 1e-6) / 1e9 if us else None
    table.append({"name": name, "us": us, "GB/s": gbs, **kw})
    us_s = f"{us:9.1f}" if us else "        -"
    gb_s = f"{gbs:7.0f}" if gbs else "      -"
    print(f"  {name:58s} {us_s} us {gb_s} GB/s", flush=True)


def moe(dev, dtype, out: list) -> None:
    from qwen35.layers.moe import SparseMoE
    from qwen35.ops.backend import Backend
    from qwen35.quant.layers import Fp8Experts, Fp8Linear

    shapes = {"35B-A3B": (2048, 256, 8, 512), "122B-A10B": (3072, 256, 8, 1024)}
    if DRY:
        shapes = {"tiny": (256, 16, 4, 128)}
    fused = Backend("cuda", triton_moe=True, interpret=DRY)
    grouped = Backend("cuda", grouped_mm=True, interpret=DRY)
    for name, (H, E, k, inter) in shapes.items():
        m = SparseMoE(H, E, k, inter, inter, dtype=dtype, device=dev)
        for p in m.parameters():
            p.normal_(0, H**-0.5)
        m.pack()  # as the loader leaves it: router + shared gate / up + shared gate in one
        packed = m.packed_router
        expert_bytes = 3 * inter * H * dtype.itemsize
        for T in (1, 4, 16):
            x = torch.randn(T, H, device=dev, dtype=dtype)
            read = min(T * k, E) * expert_bytes + expert_bytes  # picked experts (at most) + shared
            for bn, bk in ((4, 128), (8, 128), (16, 128), (4, 256)):
                _patch_block(bn, bk)
                row(out, f"moe {name} {_dt(dtype)} T={T} triton BN={bn} BK={bk}",
                    bench(m, x, fused), read, T=T, model=name, BN=bn, BK=bk)  # fmt: skip
            _patch_block(None)
            m.packed_router = None  # the router and the shared expert's gate / up apart
            row(out, f"moe {name} {_dt(dtype)} T={T} triton, router apart", bench(m, x, fused),
                read, T=T, model=name)  # fmt: skip
            m.packed_router = packed
            row(out, f"moe {name} {_dt(dtype)} T={T} grouped GEMM path", bench(m, x, grouped), read,
                T=T, model=name)  # fmt: skip
        m.experts = Fp8Experts.quantize(m.experts)
        sh = m.shared_expert
        for lin in ("gate_proj", "up_proj", "down_proj"):
            setattr(sh, lin, Fp8Linear.quantize(getattr(sh, lin).weight))
        m.pack()  # (FP8 shared expert: not with the bf16 router; the MLP packs alone)
        sh.pack()
        for T in (1, 16):
            x = torch.randn(T, H, device=dev, dtype=dtype)
            read = (min(T * k, E) + 1) * expert_bytes // dtype.itemsize  # 1 byte a weight
            row(out, f"moe {name} FP8 T={T} triton", bench(m, x, fused), read, T=T, model=name)
        # the routed experts of longer steps: the grouped GEMM over the pairs sorted by expert
        # (quant/fp8_gpu.py fp8_experts_sorted) vs the per-expert loop of block-FP8 GEMMs it
        # replaced (a host sync, two GEMMs and their activation quantisation an active expert)
        from qwen35.layers.moe import Experts
        from qwen35.quant import fp8_gpu

        w = m.experts.fused_weights()
        for T in (16, 64, 256, 1024) if not DRY else (20,):
            x = torch.randn(T, H, device=dev, dtype=dtype)
            idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)])
            tw = torch.full((T, k), 1.0 / k, device=dev, dtype=dtype)
            read = min(T * k, E) * expert_bytes // dtype.itemsize
            row(out, f"moe {name} FP8 experts T={T} sorted grouped GEMM",
                bench(fp8_gpu.fp8_experts_sorted, x, idx, tw, w), read, T=T, model=name)
            row(out, f"moe {name} FP8 experts T={T} per-expert loop",
                bench(Experts.forward, m.experts, x, idx, tw, grouped), read, T=T,
                model=name)  # fmt: skip


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _patch_block(bn, bk=None):
    from qwen35.kernels import triton_moe

    orig = getattr(triton_moe, "_orig_sparse_moe", None) or triton_moe.sparse_moe
    triton_moe._orig_sparse_moe = orig
    triton_moe.sparse_moe = orig if bn is None else (
        lambda *a, **kw: orig(*a, **kw, block_n=bn, block_k=bk or triton_moe.BK))  # fmt: skip


def fp8(dev, dtype, out: list) -> None:
    from qwen35.quant import fp8_gpu
    from qwen35.quant.formats import quantize_fp8_blocks

    shapes = {"27B in_proj": (17408, 5120), "27B out_proj": (5120, 6144), "27B down": (5120, 17408)}
    if DRY:
        shapes = {"tiny": (256, 384)}
    for name, (N, K) in shapes.items():
        w, s = quantize_fp8_blocks(torch.randn(N, K, device=dev) * 0.02)
        s = s.float()
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            args = (x, w, s, (128, 128))
            for bn in (32, 64, 128):
                row(out, f"fp8 {name} M={M} weight-only GEMV BN={bn}",
                    bench(fp8_gpu._gemv_kernel(), *args, block_n=bn), N * K, M=M)  # fmt: skip
            if not DRY and fp8_gpu._scaled_mm_ok(x.device, (128, 128)):
                row(out, f"fp8 {name} M={M} quantize + _scaled_mm",
                    bench(fp8_gpu._scaled_mm, *args), N * K, M=M)  # fmt: skip
            row(out, f"fp8 {name} M={M} quantize + Triton block GEMM",
                bench(fp8_gpu._triton_kernel(), *args), N * K, M=M)  # fmt: skip


def int_formats(dev, dtype, out: list) -> None:
    """Decode-sized products of one weight in BF16 (cuBLAS), FP8 (the weight-only GEMV) and int4
    groups of 128 / 32 (kernels/triton_int.py), bytes read as each format stores the weight; and
    the int4 MoE experts (pairs kernels + SwiGLU + weighted sum) at the 35B-A3B shapes."""
    from qwen35.quant import formats, fp8_gpu, int_gpu, matmul
    from qwen35.quant.layers import Int4Linear, IntExperts

    shapes = {"27B in_proj": (17408, 5120), "27B out_proj": (5120, 6144), "27B down": (5120, 17408)}
    if DRY:
        shapes = {"tiny": (256, 384)}
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device=dev) * 0.02
        wq, s = formats.quantize_fp8_blocks(w)
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            row(out, f"int {name} M={M} bf16 cuBLAS", bench(torch.nn.functional.linear, x,
                                                            w.to(dtype)), 2 * N * K, M=M)  # fmt: skip
            row(out, f"int {name} M={M} fp8 GEMV", bench(fp8_gpu._gemv_kernel(), x, wq, s.float(),
                                                         (128, 128)), N * K, M=M)  # fmt: skip
            for g in (128, 32):
                q, sz = formats.quantize_int4_groups(w, g, dtype)
                packed = matmul.pack_int4(q)
                nbytes = N * K // 2 + N * (K // g) * 4
                row(out, f"int {name} M={M} int4 g{g} GEMV", bench(
                    int_gpu.int4_linear_gpu, x, packed, sz, g, N), nbytes, M=M)  # fmt: skip
    # past the GEMVs: the int4 GEMM kernel vs dequantising + cuBLAS (int_gpu.DENSE_GEMM_MAX_ROWS
    # picks between them by these rows) vs BF16 cuBLAS
    from qwen35.kernels import triton_int
    from qwen35.kernels.triton_tiles import gemm_bm
    from qwen35.quant.layers import ProjStack

    label = "27B in_proj" if not DRY else "tiny"
    N, K = shapes[label]
    w = torch.randn(N, K, device=dev) * 0.02
    q, sz = formats.quantize_int4_groups(w, 128, dtype)
    packed = matmul.pack_int4(q)
    one = ProjStack("int4", packed[None], sz[None], 128)
    buf = torch.empty(N, K, device=dev, dtype=dtype)

    def dequant_gemm(x):
        triton_int.int4_dequant(packed, sz, 128, buf)
        return torch.nn.functional.linear(x, buf)

    for M in (64, 128, 256, 512, 1024, 4096) if not DRY else (65,):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        flops = dict(M=M, tflops_at_1us=2 * M * N * K / 1e6)
        row(out, f"int {label} M={M} bf16 cuBLAS",
            bench(torch.nn.functional.linear, x, w.to(dtype)), 2 * N * K, **flops)  # fmt: skip
        row(out, f"int {label} M={M} int4 GEMM kernel", bench(
            triton_int.int_gemm, x, one, M, None, gemm_bm(M)), N * K // 2, **flops)
        row(out, f"int {label} M={M} int4 dequant + cuBLAS", bench(dequant_gemm, x),
            N * K // 2, **flops)  # fmt: skip
    E, H, I, k = (256, 2048, 512, 8) if not DRY else (8, 128, 128, 2)
    gu = [Int4Linear.quantize(torch.randn(2 * I, H, device=dev) * 0.02, 128, dtype)
          for _ in range(E)]  # fmt: skip
    dn = [Int4Linear.quantize(torch.randn(H, I, device=dev) * 0.02, 128, dtype) for _ in range(E)]
    ex = IntExperts(gu, dn, I)
    ex.stack_()
    for T in (1, 4, 16):
        x = torch.randn(T, H, device=dev, dtype=dtype)
        idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)])
        tw = torch.full((T, k), 1.0 / k, device=dev, dtype=dtype)
        pairs = min(T * k, E)  # (distinct experts read, at most)
        nbytes = pairs * 3 * I * (H // 2 + H // 128 * 4)
        row(out, f"int4 MoE 35B-A3B experts T={T}",
            bench(int_gpu.int_experts_gpu, x, idx, tw, ex.stack), nbytes, T=T)  # fmt: skip
    # prefill-sized steps: the grouped GEMM over the pairs sorted by expert (int_experts_sorted)
    # vs what it replaced, every expert dequantised into one buffer + two torch._grouped_mm
    from qwen35.ops.moe import grouped_experts_gmm

    gu_buf = torch.empty(E, 2 * I, H, device=dev, dtype=dtype)
    dn_buf = torch.empty(E, H, I, device=dev, dtype=dtype)

    def dequant_grouped(x, idx, tw):
        triton_int.int4_dequant(ex.stack[0].weight, ex.stack[0].scales, 128, gu_buf)
        triton_int.int4_dequant(ex.stack[1].weight, ex.stack[1].scales, 128, dn_buf)
        return grouped_experts_gmm(x, gu_buf, dn_buf, idx, tw)

    everything = E * 3 * I * (H // 2 + H // 128 * 4)
    for T in (16, 32, 64, 256, 1024, 4096) if not DRY else (40,):
        x = torch.randn(T, H, device=dev, dtype=dtype)
        idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)])
        tw = torch.full((T, k), 1.0 / k, device=dev, dtype=dtype)
        if T <= 64:  # (the pairs kernels past MOE_MAX_ROWS too: where the two cross)
            limit, int_gpu.MOE_MAX_ROWS = int_gpu.MOE_MAX_ROWS, 64
            row(out, f"int4 MoE 35B-A3B T={T} pairs kernels",
                bench(int_gpu.int_experts_gpu, x, idx, tw, ex.stack), everything, T=T)  # fmt: skip
            int_gpu.MOE_MAX_ROWS = limit
        row(out, f"int4 MoE 35B-A3B T={T} sorted grouped GEMM",
            bench(int_gpu.int_experts_sorted, x, idx, tw, ex.stack), everything, T=T)  # fmt: skip
        if torch.cuda.is_available() and hasattr(torch, "_grouped_mm") and T >= 64:
            row(out, f"int4 MoE 35B-A3B T={T} dequantise all + grouped_mm",
                bench(dequant_grouped, x, idx, tw), everything, T=T)  # fmt: skip


def attention(dev, dtype, out: list) -> None:
    from qwen35.kernels import triton_attention as ta

    nh, nkv, hd, bs = (16, 4, 256, 16) if not DRY else (4, 2, 32, 16)
    contexts = (1024, 8192, 32768) if not DRY else (64, 200)
    for N in (1, 32) if not DRY else (1, 3):
        for ctx in contexts:
            W = -(-ctx // bs)
            kc = torch.randn(N * W, bs, nkv, hd, device=dev, dtype=dtype)
            vc = torch.randn_like(kc)
            tables = torch.arange(N * W, device=dev, dtype=torch.int32).view(N, W)
            lens = torch.full((N,), ctx, device=dev, dtype=torch.int32)
            q = torch.randn(N, nh, hd, device=dev, dtype=dtype)
            gate = torch.randn_like(q)
            kv = 2 * N * ctx * nkv * hd * dtype.itemsize
            split = ta.num_splits(ctx) if not DRY else 4
            for label, tokens in ((f"split-K ({split} ranges)", None), ("unsplit", 1 << 30)):
                kw = dict(max_context=ctx)
                if DRY and tokens is None:
                    kw["split_tokens"] = 64
                elif tokens:
                    kw["split_tokens"] = tokens
                us = bench(ta.paged_decode_attention, q, kc, vc, tables, lens, hd**-0.5, gate, **kw)
                row(out, f"attention N={N} ctx={ctx} {label}", us, kv, N=N, ctx=ctx)
    prefill_continuation(dev, dtype, out, nh, nkv, hd, bs)


def prefill_continuation(dev, dtype, out: list, nh: int, nkv: int, hd: int, bs: int) -> None:
    """A prefill chunk over its cached prefix (the engine's chunked prefill of a long prompt,
    2,048 tokens a step by default): our Triton paged kernel (the GPU path) vs gathering the
    context's K/V and torch's SDPA with a bottom-right causal bias (FlashAttention where torch
    has it) vs the same with a boolean mask (the PyTorch path). `GB/s` here is the K/V bytes;
    TFLOP/s in the row's `tflops`."""
    from qwen35.kernels import triton_attention as ta

    Tq = 2048 if not DRY else 48
    for start in (2048, 14336, 30720) if not DRY else (32, 80):
        ctx = start + Tq
        W = -(-ctx // bs)
        kc = torch.randn(W, bs, nkv, hd, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        table = torch.arange(W, device=dev, dtype=torch.int32)
        q = torch.randn(Tq, nh, hd, device=dev, dtype=dtype)
        scale = hd**-0.5
        flops = 4 * nh * hd * Tq * (start + (Tq + 1) / 2)  # QK^T and PV over the causal part

        kv = 2 * ctx * nkv * hd * dtype.itemsize
        ref = _sdpa_mask(q, kc, vc, table, ctx, scale).float()  # the three compute one thing
        for got in (ta.paged_prefill_attention(q, kc, vc, table, start, scale),
                    _sdpa_lower_right(q, kc, vc, table, ctx, scale)):  # fmt: skip
            err = (got.float() - ref).abs().max().item()
            assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"prefill paths differ: {err}"
        for label, fn, args in (
            ("Triton paged", ta.paged_prefill_attention, (q, kc, vc, table, start, scale)),
            ("gather + SDPA lower-right causal", _sdpa_lower_right, (q, kc, vc, table, ctx, scale)),
            ("gather + SDPA lower-right, cuDNN", _sdpa_lower_right,
             (q, kc, vc, table, ctx, scale, "CUDNN_ATTENTION")),
            ("gather + SDPA boolean mask", _sdpa_mask, (q, kc, vc, table, ctx, scale)),
        ):
            try:
                us = bench(fn, *args)
            except Exception as e:  # e.g. no SDPA kernel takes the bias at this head_dim
                print(f"  prefill chunk {Tq} after {start}: {label}: {type(e).__name__}: {e}"[:200])
                continue
            row(out, f"prefill chunk {Tq} after {start} {label}", us, kv, start=start,
                tflops=flops / (us * 1e-6) / 1e12 if us else None)  # fmt: skip


def _sdpa_lower_right(q, kc, vc, table, ctx: int, scale: float, backend: str | None = None):
    """The engine's SDPA chunk path (ops/attention.py: gather, then SDPA with a bottom-right
    causal bias); backend: one of torch's SDPBackend names to force (None: torch's choice)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qwen35.ops.attention import gather_kv, prefill_attention

    k, v = gather_kv(kc, table, ctx), gather_kv(vc, table, ctx)
    forced = sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()
    with forced:
        return prefill_attention(q, k, v, scale, lower_right=True)


def _sdpa_mask(q, kc, vc, table, ctx: int, scale: float):
    from qwen35.ops.attention import gather_kv, prefill_attention

    return prefill_attention(q, gather_kv(kc, table, ctx), gather_kv(vc, table, ctx), scale)


def deltanet(dev, dtype, out: list) -> None:
    from qwen35.ops.backend import Backend

    nk, nv, dk, dv = (16, 32, 128, 128) if not DRY else (2, 4, 16, 16)
    C, Vd = 2 * nk * dk + nv * dv, nv * dv
    for N in (1, 32) if not DRY else (1, 3):
        slots = torch.arange(N, device=dev)
        proj = torch.randn(N, C + Vd + 2 * nv, device=dev, dtype=dtype)
        qkv, z = proj[:, :C], proj[:, C : C + Vd].unflatten(-1, (nv, dv))
        b, a = proj[:, C + Vd : C + Vd + nv], proj[:, C + Vd + nv :]
        conv_w = torch.randn(C, 4, device=dev, dtype=dtype)
        conv = torch.randn(N, C, 3, device=dev, dtype=dtype)
        rec = torch.randn(N, nv, dk, dv, device=dev) * 0.05
        dt_bias, A_log = (torch.randn(nv, device=dev, dtype=dtype) for _ in range(2))
        norm_w = torch.ones(dv, device=dev, dtype=dtype)
        ref = Backend("cuda", interpret=DRY)

        args = (qkv, z, a, b, conv_w, conv, rec, slots, dt_bias, A_log, norm_w, nk, dtype)
        state = 2 * N * nv * dk * dv * 4  # the fp32 states, read and written
        row(out, f"deltanet N={N} gates in the kernel (3 launches)", bench(_dn_fused, *args),
            state, N=N)  # fmt: skip
        row(out, f"deltanet N={N} gates op by op (10 launches)",
            bench(_dn_gates_apart, ref, *args), state, N=N)  # fmt: skip


def _dn_fused(qkv, z, a, b, conv_w, conv, rec, slots, dt_bias, A_log, norm_w, nk, dtype):
    from qwen35.kernels import triton_deltanet as tdn
    from qwen35.kernels import triton_norms as tn

    u = tdn.conv_update_(qkv, conv_w, conv, slots)
    o = tdn.recurrent_step_(u, a, b, rec, slots, nk, gates=(dt_bias, A_log), out_dtype=dtype)
    return tn.gated_rms_norm(o, z, norm_w, 1e-6)


def _dn_gates_apart(ref, qkv, z, a, b, conv_w, conv, rec, slots, dt_bias, A_log, norm_w, nk,
                    dtype):  # fmt: skip
    from qwen35.kernels import triton_deltanet as tdn
    from qwen35.kernels import triton_norms as tn
    from qwen35.ops.deltanet import deltanet_gates

    g, beta = deltanet_gates(ref, a, b, dt_bias, A_log)
    u = tdn.conv_update_(qkv, conv_w, conv, slots)
    o = tdn.recurrent_step_(u, g, beta, rec, slots, nk).to(dtype)
    return tn.gated_rms_norm(o, z.contiguous(), norm_w, 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="moe,fp8,int,attention,deltanet")
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpreted, tiny: no timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if DRY:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run needs TRITON_INTERPRET=1 (Triton's interpreter on the CPU)")
        dev, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)")
        dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    out: list = []
    with torch.inference_mode():
        for part in args.only.split(","):
            print(f"{part}:", flush=True)
            {"moe": moe, "fp8": fp8, "int": int_formats, "attention": attention,
             "deltanet": deltanet}[part](
                dev, dtype, out
            )
    if args.out:
        env = {"device": torch.cuda.get_device_name() if not DRY else "cpu (interpreted)",
               "torch": torch.__version__}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
