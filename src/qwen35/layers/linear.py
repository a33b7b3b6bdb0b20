"""Bias-free linear layer whose weight is allocated with `torch.empty` (no init cost), and the
packing of several linears that read the same input into one weight.

Weights are loaded afterwards (the loader, or `load_state_dict`); constructing on the `meta`
device or directly on the target device costs no more than the allocation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# Packed projections serve steps of at most this many rows (decode batches, short chunks).
# Longer prefills keep separate GEMMs: their outputs are then contiguous without a copy, and
# a GEMM that long is compute-bound, so one launch instead of several saves nothing.
PACKED_MAX_ROWS = 256


def empty_param(*shape: int, dtype: torch.dtype | None, device: torch.device | str | None):
    """An uninitialised, frozen parameter (inference only: no autograd bookkeeping)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


# Rows up to which CPU matmuls take the GEMV kernels (kernels/gemv_cpu.cpp): they stream the
# weight once at the memory bandwidth; above, torch's GEMM is compute-bound and faster.
# (bench/gemv.py on a Zen 4, 2 threads: bf16 at 8 rows the kernel is 1.5x torch, at 16 rows
# 0.9x; fp32 3x torch at 1 row, 1.6x at 16 rows, where oneDNN's fp32 GEMM is still slow.)
GEMV_MAX_ROWS = {torch.bfloat16: 8, torch.float32: 16}
# bf16 rows past GEMV_MAX_ROWS that still take the kernel, up to BF16_TILED_MAX_ROWS, on CPUs
# with AVX512-BF16 dot products and no AMX, where a weight row has at most BF16_TILED_MAX_K
# inputs: there its register tiles (gemv_cpu.cpp bf16_rows_tiled) beat torch's GEMM (`python
# bench/gemv.py --formats bf16 --rows 12,16 --shapes ...`, Zen 5, 2 threads: K = 1,024 / 2,048
# 1.15-1.43x at 12-16 rows; K = 3,584 / 6,144 0.78-1.0x, so those keep the GEMM). Every output row
# is then the one the row alone gives (the kernel's bits at any row count).
BF16_TILED_MAX_ROWS, BF16_TILED_MAX_K = 16, 2048
# Rows per product the bf16 / int8 / FP8 many-kernels take (one pass of the GEMV kernels'
# row group, gemv_rows.h kMR); more and their Python wrappers say None.
MANY_MAX_ROWS = 4
# fp32 rows past the CPU kernels' 16 that still take them, 16 rows a call, by weight dtype: up to
# this many rows the chunks beat dequantising / widening the weight + torch's fp32 GEMM (`python
# bench/chunked_rows.py`, Zen 3, 2 threads, 1024 x 2048 / 2048 x 512: int8 1.80x / 1.38x at 24
# rows, 1.36x / 1.02x at 32, 0.91x at 48; bf16-stored 1.31x / 1.10x at 48, 0.91x at 64; fp32
# weights and the AVX2 FP8 kernel lose from 24-32 rows and are not chunked). These are the sizes
# of a MoE prefill's experts (~T/32 rows each on 35B-A3B) and of decode batches past 16; bf16 rows
# keep their GEMMs. Against oneDNN's fp32 GEMM (`gemm`, AMD CPUs since session 46; the same bench,
# Zen 5 VM): bf16-stored 1.06-1.66x at 24-32 rows, 0.89-1.26x at 48; int8 0.75-1.12x at 32 (AVX-512)
# and 0.78-1.46x (as an AVX2 CPU runs it); fp32 weights 0.49-0.91x at 24-96 rows, so they stay off.
CHUNKED_MAX_ROWS = {torch.bfloat16: 48, torch.int8: 32}


def chunked(x: torch.Tensor, w_dtype: torch.dtype) -> bool:
    """Whether fp32 rows x [M, K] on a CPU, more than a kernel call's 16, run a kernel in 16-row
    chunks (in_chunks) for a weight stored as w_dtype."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.is_cpu
            and 16 < x.shape[0] <= CHUNKED_MAX_ROWS.get(w_dtype, 0))  # fmt: skip


def in_chunks(fn, x: torch.Tensor, step: int) -> torch.Tensor:
    """fn(rows) -> [r, N] on x [M, K] (contiguous) in chunks of at most `step` rows, stacked."""
    if x.shape[0] <= step:
        return fn(x)
    return torch.cat([fn(x[i : i + step]) for i in range(0, x.shape[0], step)])


def bf16_stored(x: torch.Tensor, w: torch.Tensor) -> bool:
    """fp32 rows on a bf16-stored weight (`--quantization bf16`: fp32 compute, 2 bytes a weight)."""
    return x.dtype == torch.float32 and w.dtype == torch.bfloat16


def bf16_tiles() -> bool:
    """Whether this CPU runs the bf16 kernel's register tiles in place of torch's GEMM (AVX512-BF16,
    no AMX; QWEN35_CPU_ISA=avx2 hides them, as it hides them from the kernels)."""
    from qwen35.devices import cpu_flags, cpu_has_amx

    return "avx512_bf16" in cpu_flags() and not cpu_has_amx()


def gemv_max_rows(x: torch.Tensor, w: torch.Tensor) -> int:
    """Rows of x up to which x @ w^T takes the GEMV kernel on a CPU (GEMV_MAX_ROWS, bf16 rows
    up to BF16_TILED_MAX_ROWS where bf16_tiles and w's rows are short enough)."""
    if x.dtype == torch.bfloat16 and w.shape[-1] <= BF16_TILED_MAX_K and bf16_tiles():
        return BF16_TILED_MAX_ROWS
    return GEMV_MAX_ROWS.get(x.dtype, 0)


def gemv_kernel_for(x: torch.Tensor, w: torch.Tensor):
    """The GEMV module when `linear` runs x @ w^T through it (bf16 / fp32 rows on weights of
    their dtype or fp32 rows on bf16 weights, few rows), else None."""
    if not (
        x.dim() == 2
        and x.is_cpu
        and (x.dtype == w.dtype or bf16_stored(x, w))
        and x.shape[0] <= gemv_max_rows(x, w)
        and w.is_contiguous()
    ):
        return None
    from qwen35.kernels import gemv

    return gemv.load()  # None once QWEN35_NO_KERNELS=1 is set, at any time


# fp32 GEMMs through oneDNN instead of MKL: "onednn" / "mkl" (QWEN35_FP32_GEMM), default by CPU
# vendor. torch's fp32 F.linear on a CPU is MKL's sgemm, which on AMD CPUs takes a slower code
# path than on Intel ones; oneDNN's (torch.ops.mkldnn._linear_pointwise, what Inductor runs) picks
# its kernels by ISA alone (`python bench/fp32_gemm.py`, Zen 5 VM, 2 threads: the 0.8B's MLP
# gate_up at 32 / 256 / 2,048 rows 2.5x / 2.7x / 2.0x; both differ from one row's product alone
# in the last bits). Intel CPUs keep MKL (unmeasured here).
FP32_GEMM_ENV = "QWEN35_FP32_GEMM"


@functools.lru_cache(maxsize=1)
def onednn_fp32() -> bool:
    """Whether fp32 GEMMs on the CPU take oneDNN (`gemm`)."""
    import os

    from qwen35.devices import cpu_vendor

    choice = os.environ.get(FP32_GEMM_ENV, "")
    if choice not in ("", "onednn", "mkl"):
        raise ValueError(f"{FP32_GEMM_ENV}={choice!r}: use onednn or mkl (or leave it unset)")
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return usable and (choice == "onednn" or (not choice and cpu_vendor() == "AuthenticAMD"))


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias) through a library GEMM: F.linear, or oneDNN's for fp32 on
    the CPUs `onednn_fp32` picks."""
    if x.dtype == w.dtype == torch.float32 and x.is_cpu and onednn_fp32() \
            and (bias is None or bias.dtype == torch.float32):  # fmt: skip
        return _onednn_linear(x, w, bias)
    return F.linear(x, w, bias)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T (in x's dtype)."""
    if (mod := gemv_kernel_for(x, w)) is not None:
        x = x.contiguous()
        return mod.linear_fp32(x, w) if w.dtype == torch.float32 else mod.linear_bf16(x, w)
    if chunked(x, w.dtype) and (mod := gemv_kernel_for(x[:16], w)) is not None:
        fn = mod.linear_fp32 if w.dtype == torch.float32 else mod.linear_bf16
        return in_chunks(lambda v: fn(v, w), x.contiguous(), 16)
    if x.dtype != w.dtype:  # fp32 rows on bf16-stored weights, more rows than the kernel's
        from qwen35.quant.matmul import widened_linear

        return widened_linear(x, w)
    if x.dim() == 2 and x.shape[0] == 1 and x.is_cpu and w.dtype != torch.float32:
        # one row of bf16/fp16 without the kernel: torch.mv streams the weight faster than
        # the oneDNN GEMM F.linear takes
        return torch.mv(w, x[0])[None]
    return gemm(x, w)


# lm_head rows past the bf16 GEMV kernel's 8 that still take it, 8 rows a call (head_linear), on
# CPUs with AVX512-BF16 dot products and no AMX (measured on a Zen 5). On AVX2 ones the kernel
# widens bf16 and 16 rows of the 0.8B's head took 79 ms in chunks against 34 for torch's GEMM
# (QWEN35_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 on the Zen 5, `bench/head_screen.py --head-only`);
# AMX CPUs (Sapphire Rapids) keep their GEMM's bf16 tiles (unmeasured against the chunks).
HEAD_GEMV_MAX_ROWS = {torch.bfloat16: 16}


def head_gemv_max_rows(dtype: torch.dtype) -> int:
    """Rows of `dtype` up to which head_linear keeps lm_head on the GEMV kernel."""
    from qwen35.devices import cpu_flags, cpu_has_amx

    # (QWEN35_CPU_ISA=avx2 hides the AVX512 and AMX flags)
    extra = HEAD_GEMV_MAX_ROWS.get(dtype, 0)
    chunks = "avx512_bf16" in cpu_flags() and not cpu_has_amx()
    return extra if extra and chunks else GEMV_MAX_ROWS.get(dtype, 0)


def head_kernel_rows(x_dtype: torch.dtype, w: torch.Tensor) -> int:
    """Rows of x_dtype up to which head_linear(x, w) on a CPU gives every row the GEMV kernel's
    output (what the row gets alone): bf16 head_gemv_max_rows; fp32 rows also the 16-row chunks
    `linear` takes up to CHUNKED_MAX_ROWS. The head screen's exact rows need that."""
    n = head_gemv_max_rows(x_dtype)
    return max(n, CHUNKED_MAX_ROWS.get(w.dtype, 0)) if x_dtype == torch.float32 else n


def head_linear(x: torch.Tensor, w: torch.Tensor, fn=None) -> torch.Tensor:
    """`linear` for lm_head: bf16 rows past the GEMV kernel's limit, up to head_gemv_max_rows,
    run it in chunks of that limit instead of torch's GEMM. Every output row is then the
    kernel's, whatever the rows beside it, which the head screen's exact rows need to be the
    full head's bits (models/head_screen.py), and the head adds no batch dependence of its own.
    16 rows of the 0.8B's head: alone 31 ms in chunks vs 25 for the GEMM (`python
    bench/head_screen.py --head-only`), in the engine's batch-16 steps 102-105 vs 113 ms a step
    (`--batch 16 --gemm`). fn: what computes a chunk (default `linear`; the model passes
    lm_head itself, so adapters apply)."""
    fn = fn or (lambda v: linear(v, w))
    step = gemv_max_rows(x, w)  # (16 bf16 rows where the kernel's tiles take them: one call)
    if (
        x.dim() == 2
        and step < x.shape[0] <= head_gemv_max_rows(x.dtype)
        and gemv_kernel_for(x[:step], w) is not None
    ):
        return in_chunks(fn, x.contiguous(), step)
    return fn(x)


def linear_many(xs: list, ws: list) -> torch.Tensor | None:
    """torch.cat([linear(x_i, w_i)]) for bf16 weights of one shape, bit for bit, in one kernel
    call (`linear_bf16_many`: a MoE layer's picked experts; bf16 rows, or fp32 rows on
    bf16-stored weights); None where `linear` would not take the bf16 GEMV kernel for them (or
    more than MANY_MAX_ROWS rows)."""
    x = xs[0]
    mod = gemv_kernel_for(x, ws[0])
    if mod is None or ws[0].dtype != torch.bfloat16 or max(v.shape[0] for v in xs) > MANY_MAX_ROWS \
            or not all(v.is_contiguous() for v in ws):  # fmt: skip
        return None
    return mod.linear_bf16_many([v.contiguous() for v in xs], ws)


class Linear(nn.Module):
    """y = x @ weight^T with weight [out_features, in_features] (checkpoint layout), plus the
    deltas of the step's LoRA adapters when some are attached (layers/lora.py). Quantized
    subclasses (qwen35.quant) override `matmul`."""

    lora = None  # layers/lora.py LoraDelta: adapters served per request

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        y = self.matmul(x)
        if self.lora is not None:
            self.lora.add_to(x, y)
        return y

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T alone (no adapters)."""
        return linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"


def pack_linears(*linears: Linear, rows_multiple: int = 1) -> torch.Tensor:
    """Copy the linears' weights into one [sum(out), in] tensor and make each weight a row-slice
    view of it (contiguous; parameter names and state_dict unchanged; no extra memory after).

    A decode step then reads all of them in one GEMV: on a CPU, small matrices pay thread
    fork/join and loop set-up per call (Qwen3.5-0.8B decode: 187 -> 97 GEMVs per token).
    Call once the weights are loaded and on their final device (the loader's post_load):
    moving the model afterwards gives the parameters new storage and breaks the packing.
    Quantized linears (qwen35.quant) pack by format instead: the result is then a callable.
    rows_multiple: zero rows after the last linear's up to a multiple of it (16: the matmul's
    output has a row stride that Triton specialises on, so kernels reading its column slices
    can vectorise their loads)."""
    if any(type(lin) is not Linear for lin in linears):
        from qwen35.quant.packing import pack_quantized

        return pack_quantized(linears)
    ws = [lin.weight.detach() for lin in linears]
    pad = -sum(w.shape[0] for w in ws) % rows_multiple
    w = _laid_out(ws, pad)  # (the loader's allocation: loader.materialize)
    if w is None:
        if pad:
            ws.append(ws[0].new_zeros(pad, ws[0].shape[1]))
        w = torch.cat(ws)  # [sum(out) (+ pad), in]
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(w[row : row + n], requires_grad=False)
        row += n
    return w


def _laid_out(ws: list[torch.Tensor], pad: int) -> torch.Tensor | None:
    """The packed [sum(out) + pad, in] tensor where `ws` already are its consecutive row
    slices, filling one storage of exactly that size from its start (the loader allocates a
    pack group so, loader.materialize: no copy then); else None. Its pad rows are zeroed."""
    w0 = ws[0]
    st, cols = w0.untyped_storage(), w0.shape[1]
    rows = sum(w.shape[0] for w in ws) + pad
    if st.nbytes() != rows * cols * w0.element_size() or st.device != w0.device:
        return None
    offset = 0
    for w in ws:
        if (w.dim() != 2 or w.shape[1] != cols or w.dtype != w0.dtype or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != st.data_ptr()
                or w.storage_offset() != offset):  # fmt: skip
            return None
        offset += w.numel()
    base = w0.new_empty(0).set_(st, 0, (rows, cols), (cols, 1))
    if pad:
        base[rows - pad :].zero_()
    return base


def packed_linear(x: torch.Tensor, packed: torch.Tensor | None, *linears: Linear):
    """The outputs of `linears` on x: one matmul on the packed weight for short inputs,
    one per linear otherwise. Outputs of the packed path are column views (not contiguous
    when x has several rows). LoRA adapters of the linears are added to their outputs."""
    if packed is None or (isinstance(packed, torch.Tensor) and x.shape[0] > PACKED_MAX_ROWS):
        return tuple(lin(x) for lin in linears)
    if isinstance(packed, torch.Tensor):
        outs = linear(x, packed).split([lin.out_features for lin in linears], dim=-1)
    else:
        outs = packed(x)  # quantized weights: always packed (qwen35.quant.packing)
    if any(lin.lora is not None for lin in linears):
        from qwen35.layers.lora import add_lora

        add_lora(x, outs, linears)
    return outs
