"""Block-FP8 GEMMs on CUDA: y = x @ dequant(W)^T with W e4m3 [N, K] and one scale per 128x128
block; activations are quantized on the fly to e4m3 per token and group of 128 inputs (the
DeepSeek-V3 / Qwen FP8 recipe that vLLM and SGLang run).

Paths, in order: up to 16 rows (decode), a weight-only Triton GEMV (`_gemv_kernel`: e4m3 read
as stored, x not quantized, one launch); then `torch._scaled_mm` with blockwise scales (1x128 for x, 128x128 for W) where
this torch and GPU accept them - probed once per device against the reference below, so a
build that rejects or misreads the scale layout is never used; else the Triton kernel
`_fp8_block_kernel` (fp8 tensor-core dots, scales applied per K block in fp32); else (no Triton,
or a GPU older than sm_89, where Triton has no e4m3 and the two Triton kernels fail to build:
`_built` remembers that and warns once) dequantise + a BF16 GEMM. UNMEASURED: no GPU was available where this was written; the
`@pytest.mark.gpu` tests in tests/test_quant_gpu.py check every path against the reference.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from qwen35.quant.formats import FP8_DTYPE, FP8_MAX, FP8_ROW_WIDTHS, dequantize_fp8_blocks

GROUP = 128
log = logging.getLogger("qwen35")


def quantize_activations(x: torch.Tensor, group: int = GROUP):
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)]), amax / 448 per token-group."""
    M, K = x.shape
    ng = -(-K // group)
    xp = F.pad(x.float(), (0, ng * group - K)).view(M, ng, group)
    s = (xp.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)  # [M, ng]
    q = (xp / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(M, ng * group)[:, :K].to(FP8_DTYPE)
    return q.contiguous(), s


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """What every path must match: dequantised weight, full-precision activations."""
    return F.linear(x, dequantize_fp8_blocks(w, scale, x.dtype, block))


def _scaled_mm(x, w, scale, block):
    xq, xs = quantize_activations(x)
    # blockwise: scale_a [M, K/128] (outer-dim major), scale_b [K/128, N/128]
    return torch._scaled_mm(
        xq,
        w.t(),
        scale_a=xs.t().contiguous().t(),
        scale_b=scale.float().t(),
        out_dtype=x.dtype,
    )


@functools.lru_cache(maxsize=8)
def _scaled_mm_ok(device: torch.device, block: tuple[int, int]) -> bool:
    if block != (128, 128):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    w32 = torch.randn(256, 256, device=device, generator=g) * 0.05
    from qwen35.quant.formats import quantize_fp8_blocks

    w, s = quantize_fp8_blocks(w32)
    # the row counts the model calls it with: one decode row (scale_a's row stride is then 1),
    # and an odd batch (cuBLASLt's blockwise scaling may want aligned scale rows)
    for m in (1, 33):
        x = torch.randn(m, 256, device=device, generator=g).to(torch.bfloat16)
        try:
            y = _scaled_mm(x, w, s.float(), block)
        except Exception:  # noqa: BLE001 - unsupported on this torch / GPU: use the Triton kernel
            return False
        ref = reference(x, w, s, block).float()
        if not ((y.float() - ref).norm() / ref.norm()) < 0.05:
            return False
    return True


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _fp8_block_kernel(
        A,
        B,
        C,
        As,
        Bs,
        M,
        N,
        K,  # A [M, K] e4m3, B [N, K] e4m3, C [M, N]
        s_am,
        s_bn,
        s_cm,
        s_asm,
        s_bsn,  # row strides (A, B, C, As [M, nk], Bs [nbn, nk])
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BM: tl.constexpr,
        BLOCK_O: tl.constexpr,  # weight rows a scale covers: BLOCK_N, or 1 (one scale a row)
    ):
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k = kb * BLOCK_K + rk
            a = tl.load(
                A + rm[:, None] * s_am + k[None, :],
                mask=(rm[:, None] < M) & (k[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                B + rn[None, :] * s_bn + k[:, None],
                mask=(rn[None, :] < N) & (k[:, None] < K),
                other=0.0,
            )
            a_s = tl.load(As + rm * s_asm + kb, mask=rm < M, other=0.0)  # [BM]
            if BLOCK_O == BLOCK_N:
                b_s = tl.load(Bs + pn * s_bsn + kb)  # this tile's one weight block scale
                acc += tl.dot(a, b) * a_s[:, None] * b_s
            else:  # a scale per weight row (blocks of one row)
                b_r = tl.load(Bs + (rn // BLOCK_O) * s_bsn + kb, mask=rn < N, other=0.0)
                acc += tl.dot(a, b) * a_s[:, None] * b_r[None, :]
        tl.store(
            C + rm[:, None] * s_cm + rn[None, :],
            acc.to(C.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )

    def run(x, w, scale, block):
        xq, xs = quantize_activations(x, block[1])
        M, K = xq.shape
        N = w.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        BM = block_m(M)
        bn = block[0] if block[0] >= 16 else ROW_SCALE_BLOCK_N  # (tl.dot: 16 rows at least)
        grid = (triton.cdiv(M, BM), triton.cdiv(N, bn))
        s = scale.float().contiguous()
        _fp8_block_kernel[grid](
            xq, w, y, xs, s, M, N, K,
            xq.stride(0), w.stride(0), y.stride(0), xs.stride(0), s.stride(0),
            BLOCK_N=bn, BLOCK_K=block[1], BM=BM, BLOCK_O=block[0],
        )  # fmt: skip
        return y

    run.kernel = _fp8_block_kernel  # tests/test_triton_compile.py compiles it for sm_90
    return run


ROW_SCALE_BLOCK_N = 64  # weight rows a program takes when each row has its own scale (bo = 1)
GEMV_MAX_ROWS = 16  # decode-sized inputs: the weight-only kernel below (its MAX_ROWS)


@functools.lru_cache(maxsize=1)
def _gemv_kernel():
    """The weight-only FP8 GEMV for up to GEMV_MAX_ROWS rows (kernels/triton_fp8.py `fp8_gemv`:
    e4m3 read as stored, x not quantized, one launch; the GEMM paths above quantize x per
    token-group, ~9 small kernels before the matmul); None without Triton."""
    try:
        from qwen35.kernels.triton_fp8 import fp8_gemv
    except ImportError:
        return None
    return fp8_gemv


def block_m(M: int) -> int:
    """Rows of x per program of the Triton kernel."""
    return 16 if M <= 16 else 64


def fp8_linear_gpu(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ dequant(w [N, K], scale)^T on CUDA -> [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    block = tuple(block)
    y = None
    if (
        x2.shape[0] <= GEMV_MAX_ROWS
        and block[1] in FP8_ROW_WIDTHS
        and x2.stride(1) == 1
        and w.is_contiguous()
        and (gemv := _gemv_kernel()) is not None
    ):  # a decode step: weight-only, one launch
        y = _built("gemv", gemv, x2, w, scale, block)
    if y is None and _scaled_mm_ok(x.device, block) and x2.shape[1] % 128 == 0 \
            and w.shape[0] % 128 == 0:  # fmt: skip
        y = _scaled_mm(x2, w, scale, block)
    if y is None and (kern := _triton_kernel()) is not None:
        y = _built("block GEMM", kern, x2, w, scale, block)
    if y is None:
        y = reference(x2, w, scale, block)
    return y.view(*x.shape[:-1], w.shape[0])


UNBUILT: dict[str, str] = {}  # Triton paths this GPU cannot build (Triton has e4m3 from sm_89)


def _built(name: str, run, *args):
    """run(*args), or None where its kernel does not build on this GPU (kernels/unavailable.py;
    remembered, logged once: the next path takes over). Nothing was launched when it fails."""
    if name in UNBUILT:
        return None
    from qwen35.kernels.unavailable import is_build_error

    try:
        return run(*args)
    except Exception as e:
        if not is_build_error(e):
            raise
        UNBUILT[name] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
        log.warning("FP8 %s kernel cannot be built on this GPU (%s); FP8 linears take the next "
                    "path", name, UNBUILT[name])  # fmt: skip
        return None


@functools.lru_cache(maxsize=1)
def _grouped_kernel():
    """kernels/triton_fp8.py `fp8_grouped_gemm`, or None without Triton."""
    try:
        from qwen35.kernels.triton_fp8 import fp8_grouped_gemm
    except ImportError:
        return None
    return fp8_grouped_gemm


def fp8_experts_sorted(x, top_idx, top_w, w, backend=None) -> torch.Tensor | None:
    """The routed experts of a step of any size from FP8 experts as stored (w: ops/moe.py
    ExpertWeights with e4m3 weights and fp32 block scales) by kernels/triton_fp8.py's grouped
    GEMM over the pairs sorted by expert (ops/moe.py `tiled_experts`: no host sync,
    deterministic; activations not quantized, as the Triton MoE of fewer tokens). None: no
    kernel (the caller's per-expert loop then)."""
    from qwen35.ops.moe import tiled_experts

    kern = _grouped_kernel()
    if kern is None:
        return None
    block = (w.block_o, w.block_k)
    I = w.down.shape[2]

    def gemm(which, inp, rows, tiles, bm, xidx, yidx):
        gu = which == "gate_up"
        wt, s = (w.gate_up, w.gate_up_scale) if gu else (w.down, w.down_scale)
        return _built("grouped GEMM", kern, inp, wt, s, block, I if gu else wt.shape[1], rows,
                      tiles, bm, xidx, yidx)  # fmt: skip

    return tiled_experts(x, top_idx, top_w, w.gate_up.shape[0], gemm, backend)
