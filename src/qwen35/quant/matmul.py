"""x @ W^T for quantized weights, one function per format, choosing the path by rows and device.

CPU (measured with `bench/gemv.py` and `bench/quant_linear.py`):
- few rows (decode): a kernel that reads the quantized bytes directly - ours
  (`kernels/gemv_cpu.cpp`) for int8 and, on AVX512-VBMI + BF16 CPUs, FP8 (elsewhere the AVX2
  `fp8_cpu.cpp` kernel); for int4 ours (`kernels/int4_cpu.cpp`) on AVX512-VBMI + BF16 CPUs and
  for fp32 rows, elsewhere torch's `_weight_int4pack_mm_for_cpu` where it reads our int4
  layout (torch's AVX512 one: `torch_int4_layout`; on AVX2 CPUs ours); memory-bound, so 1 or 0.5
  byte per weight instead of 2;
- many rows (prefill): the packed-weight kernels run at a fraction of a GEMM's FLOP/s, so the
  weight is dequantised into one reused buffer and a regular GEMM runs on it (the buffer
  costs one layer's largest matrix, never a copy of the model); except int4 with 8-bit
  activations on CPUs without AVX512, whose integer kernel beats the fp32 GEMM at every row
  count (`int4_kernel_for`, bench/int4_prefill.py).
GPU: block-FP8 GEMMs in `fp8_gpu`; int4 / int6 / int8 in `int_gpu` (Triton GEMVs reading these
layouts for decode rows, dequantisation + a GEMM for more).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qwen35.layers.linear import MANY_MAX_ROWS, chunked, gemm, in_chunks
from qwen35.quant import formats

# bench/quant_linear.py, 3584 x 1024, 2 threads: int8 kernel 0.10 / 0.78 ms at 1 / 16 rows vs
# dequant + GEMM 0.76 / 1.05; int4 kernel 2.7 ms at 64 rows vs 27 ms for our PyTorch unpack
INT8_MAX_ROWS = 16
# int4 (bench/gemv.py --formats int4 and bench/quant_linear.py, 2 threads, Zen 4): ours 2.4-2.6x
# torch's kernel at 1 row (0.077 vs 0.197 ms for 7168 x 1024, 48 vs 19 GB/s), 2.3x at 16; torch's
# fp32 int4 kernel is far slower still (20 ms at 1 row, 1 thread). Above 16 rows our K-major
# unpack (int4_cpu.cpp int4_dequant, 13 G weights/s, 0.55 ms for 7168 x 1024; the scalar one did
# 0.9) + a BF16 GEMM wins: 7168 x 1024 at 32 / 64 / 256 rows 2.0 / 3.1 / 9.8 ms vs 2.7 / 5.4 /
# 21.6 for torch's kernel (1024 x 3584: 0.86 vs 1.02 ms at 24 rows, 0.80 vs 0.75 at 16). Without
# the compiled module torch's kernel runs at every size (unpacking in PyTorch is slower still).
# With 8-bit activations on CPUs without AVX512, our kernel at every row count instead (its
# integer panel path: int4_kernel_for).
INT4_MAX_ROWS = 16

_scratch: dict[tuple, torch.Tensor] = {}


def scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused [out, in] buffer for dequantised weights: one per dtype and device, grown to the
    largest matrix seen. Safe because each use is consumed by the GEMM right after it. Made
    outside inference mode, so it can be written in and out of it (an inference tensor, made by a
    first call under torch.inference_mode, refuses in-place writes outside it)."""
    n = shape[0] * shape[1]
    key = (dtype, device)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):
            buf = _scratch[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def widened_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T for a weight stored in a narrower float dtype than x (bf16 weights
    of an fp32 model, `--quantization bf16`): widened into the reused buffer, then a GEMM (the
    rows layers/linear.py `linear` does not give its GEMV kernel)."""
    buf = scratch(tuple(w.shape), x.dtype, x.device)
    buf.copy_(w)
    return gemm(x, buf)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """x [..., K] @ dequant(w [N, K] e4m3, scale [nbo, nbi] fp32)^T -> [..., N] in x.dtype."""
    if x.is_cuda:
        from qwen35.quant.fp8_gpu import fp8_linear_gpu

        return fp8_linear_gpu(x, w, scale, block)
    x2 = _rows(x)
    from qwen35.kernels import fp8 as kern

    if (got := fp8_kernel_for(x, block)) is not None:
        fast, cvt = got
        y = fast.linear_fp8(x2.contiguous(), w, scale, block[0], block[1], cvt)
        return y.view(*x.shape[:-1], w.shape[0])
    mod = kern.load()
    if (
        mod is not None
        and x2.shape[0] <= kern.MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float32)
    ):
        y = mod.fp8_linear(x2.contiguous(), w, scale, block[0], block[1])
    else:
        buf = scratch(tuple(w.shape), x.dtype, x.device)
        if mod is not None and x.dtype in (torch.bfloat16, torch.float32):
            mod.fp8_dequant(w, scale, buf, block[0], block[1])
        else:
            buf.copy_(formats.dequantize_fp8_blocks(w, scale, x.dtype, block))
        y = gemm(x2, buf)
    return y.view(*x.shape[:-1], w.shape[0])


def fp8_kernel_for(x: torch.Tensor, block):
    """(the GEMV module, cvt) when fp8_linear runs x through its `linear_fp8`, else None.
    AVX512-VBMI + BF16 (cvt False): exact bf16 weights from two byte tables, then vdpbf16ps;
    other AVX512 CPUs (cvt True): the weights' fp16 bits converted to fp32, then FMA."""
    from qwen35.kernels import gemv

    fast = gemv.load()
    if fast is None or not x.is_cpu or x.dtype != torch.bfloat16 or \
            _rows(x).shape[0] > gemv.MAX_ROWS:  # fmt: skip
        return None
    tables = fast.fp8_supported(block[1])
    return (fast, not tables) if tables or fast.fp8_cvt_supported() else None


def fp8_linear_many(xs: list, ws: list, scales: list, block) -> torch.Tensor | None:
    """torch.cat([fp8_linear(x_i, w_i, scale_i, block)]) for FP8 weights of one shape, bit for
    bit, in one kernel call (a MoE layer's picked FP8 experts): gemv_cpu.cpp's `linear_fp8_many`
    where fp8_linear takes its `linear_fp8` (AVX512, bf16 rows), else fp8_cpu.cpp's
    `fp8_linear_many` (the AVX2 kernel, bf16 or fp32 rows); None where fp8_linear would take
    neither, or past MANY_MAX_ROWS rows."""
    if not xs[0].is_cpu or max(_rows(v).shape[0] for v in xs) > MANY_MAX_ROWS:
        return None
    rows = [_rows(v).contiguous() for v in xs]
    if (got := fp8_kernel_for(xs[0], block)) is not None:
        fast, cvt = got
        return fast.linear_fp8_many(rows, ws, scales, block[0], block[1], cvt)
    from qwen35.kernels import fp8 as kern

    mod = kern.load()
    if mod is None or xs[0].dtype not in (torch.bfloat16, torch.float32):
        return None
    return mod.fp8_linear_many(rows, ws, scales, block[0], block[1])


def int8_ok(k: int) -> bool:
    """`_weight_int8pack_mm` needs K % 16 == 0 (wrong results otherwise, seen with K = 72)."""
    return k % 16 == 0


def int8_kernel_for(x: torch.Tensor, scale: torch.Tensor):
    """The GEMV module when int8_linear runs x through its `linear_int8`, else None."""
    if not (x.is_cpu and _rows(x).shape[0] <= INT8_MAX_ROWS):
        return None
    from qwen35.kernels import gemv

    mod = gemv.load()
    return mod if mod is not None and scale.dtype == x.dtype and scale.is_contiguous() else None


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] int8 * scale [N])^T."""
    x2 = _rows(x)
    if x.is_cuda:
        from qwen35.quant.int_gpu import int8_linear_gpu

        if (y := int8_linear_gpu(x2, q, scale)) is not None:
            return y.view(*x.shape[:-1], q.shape[0])
    if (kern := int8_kernel_for(x, scale)) is not None:
        y = kern.linear_int8(x2.contiguous(), q, scale)  # any K; 1.1-1.9x torch's kernel
        return y.view(*x.shape[:-1], q.shape[0])
    if chunked(x2, q.dtype) and (kern := int8_kernel_for(x2[:INT8_MAX_ROWS], scale)) is not None:
        y = in_chunks(lambda v: kern.linear_int8(v, q, scale), x2.contiguous(), INT8_MAX_ROWS)
        return y.view(*x.shape[:-1], q.shape[0])
    if x.is_cpu and x2.shape[0] <= INT8_MAX_ROWS and int8_ok(q.shape[1]):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale)
        return y.view(*x.shape[:-1], q.shape[0])
    buf = scratch(tuple(q.shape), x.dtype, x.device)
    # [N, K] in x.dtype: the same products as torch.mul(q, scale[:, None], out=buf), whose
    # mixed-dtype loop took 3.8 ms for 1024 x 2048 where these two take 0.27 (Zen 3, 2 threads)
    buf.copy_(q).mul_(scale[:, None])
    y = gemm(x2, buf)
    return y.view(*x.shape[:-1], q.shape[0])


INT6_VOCAB_CHUNK = 16384  # rows of W dequantised at a time without the kernel


def int6_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T with W in 6-bit groups of 32 (formats.quantize_int6_groups: lm_head under
    int4): kernels/int6_cpu.cpp 16 rows a call (each call streams W once; more rows, more
    calls: still far cheaper than dequantising a 248K-row head for a GEMM), else the PyTorch
    twin in chunks of the vocabulary (no kernel, another device)."""
    from qwen35.kernels import gemv

    x2, n = _rows(x), packed.shape[0]
    if x.is_cuda:
        from qwen35.quant.int_gpu import int6_linear_gpu

        return int6_linear_gpu(x2, packed, scales).view(*x.shape[:-1], n)
    kern = gemv.load_int6() if x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) else None
    if kern is not None:
        y = in_chunks(lambda v: kern.linear_int6(v, packed, scales), x2.contiguous(),
                      gemv.MAX_ROWS)  # fmt: skip
    else:
        y = torch.cat([formats.int6_linear_reference(x2, packed[r : r + INT6_VOCAB_CHUNK],
                                                     scales[r : r + INT6_VOCAB_CHUNK])
                       for r in range(0, n, INT6_VOCAB_CHUNK)], -1).to(x.dtype)  # fmt: skip
    return y.view(*x.shape[:-1], n)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, n: int, x8: bool = True
) -> torch.Tensor:
    """x [..., K] @ W^T with W in torch's packed CPU int4 layout ([n, K/2] uint8, groups of
    `group` inputs, scales_and_zeros [K/group, n, 2]). x8 (Int4Linear.x8): x rounded to 8 bits
    per 32 inputs, in our kernel up to 16 rows (at any row count on CPUs without AVX512:
    int4_kernel_for) and before the GEMM above (where our module runs: a row's result
    then does not depend on the rows beside it)."""
    if x.is_cuda:  # the GPU's kernels (activations not rounded: x8 is a CPU setting)
        from qwen35.quant.int_gpu import int4_linear_gpu

        return int4_linear_gpu(_rows(x), packed, sz, group, n).view(*x.shape[:-1], n)
    x2, x8 = _rows(x), int4_x8(x8, group)
    # up to 16 rows, ours: with x8, or bf16 rows on AVX512-VBMI + BF16 CPUs (torch's kernel beat
    # our 16-bit AVX2 path) or where torch's kernel reads another layout, fp32 rows everywhere
    # (torch's fp32 int4 kernel is several times slower)
    if (kern := int4_kernel_for(x, sz, x8)) is not None:
        y = kern.linear_int4(x2.contiguous(), packed, sz, group, n, x8=x8)
        return y.view(*x.shape[:-1], n)
    mod = None  # up to 16 rows otherwise: torch's kernel (or, where it reads another layout
    # and ours did not load, the PyTorch reference below)
    if x2.shape[0] > INT4_MAX_ROWS and x.is_cpu and sz.dtype == x.dtype \
            and x.dtype in (torch.bfloat16, torch.float32):  # fmt: skip
        from qwen35.kernels import gemv

        mod = gemv.load_int4()  # more rows: our unpack + a GEMM
    if mod is not None:
        wt = scratch((packed.shape[1] * 2, n), x.dtype, x.device)  # W^T [K, N]: K-major unpack
        mod.int4_dequant(packed, sz, group, wt.t())
        if x8:  # x rounded as the decode rows round it: a row's result does not depend on
            x2 = mod.int4_x8_round(x2.contiguous())  # whether its call had more than 16 rows
        y = gemm(x2, wt.t())
    elif torch_int4_takes(group):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group, sz)
    else:  # no kernel of ours, and torch's reads another layout here: the PyTorch reference
        k = packed.shape[1] * 2
        w = formats.dequantize_int4_groups(unpack_int4(packed, n, k), sz, group, x.dtype)
        y = F.linear(x2, w)
    return y.view(*x.shape[:-1], n)


def int8_linear_many(xs: list, layers: list) -> torch.Tensor | None:
    """torch.cat([int8_linear(x_i, layer_i)]) for Int8Linear layers of one shape, bit for bit,
    in one kernel call (`linear_int8_many`); None where int8_linear would not take our kernel
    (or more than MANY_MAX_ROWS rows)."""
    scales = [m.weight_scale for m in layers]
    kern = int8_kernel_for(xs[0], scales[0])
    if kern is None or max(_rows(v).shape[0] for v in xs) > MANY_MAX_ROWS or \
            not all(s.dtype == scales[0].dtype and s.is_contiguous() for s in scales):  # fmt: skip
        return None
    return kern.linear_int8_many([_rows(v).contiguous() for v in xs], [m.weight for m in layers],
                                 scales)  # fmt: skip


def int4_kernel_for(x: torch.Tensor, sz: torch.Tensor, x8: bool = False):
    """The int4 module when int4_linear runs x through its `linear_int4` (with `x8`), else
    None. Up to INT4_MAX_ROWS rows (decode) as int4_rows_ours says; more (prefill) only with
    8-bit activations where int4_prefill_in_kernel says the kernel's integer sums beat
    dequantising + the GEMM; a row's result is then the same bits at any row count (a prompt
    prefilled alone or beside others, a decode row beside a prefill chunk)."""
    if not (x.is_cpu and sz.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float32)):
        return None
    from qwen35.kernels import gemv

    if _rows(x).shape[0] > INT4_MAX_ROWS and not (x8 and int4_prefill_in_kernel()):
        return None
    mod = gemv.load_int4()
    K, groups = x.shape[-1], sz.shape[0]  # (sz: [K / group, n, 2])
    torch_takes = K % groups == 0 and torch_int4_takes(K // groups)
    if mod is None or (torch_takes and not int4_rows_ours(mod, x.dtype, x8)):
        return None
    return mod


def int4_prefill_in_kernel() -> bool:
    """Whether long int4 inputs with 8-bit activations take the integer kernel here rather than
    dequantising + torch's GEMM: on CPUs without AVX512 (the AVX2 path: vpmaddubsw on a panel of
    the unpacked nibbles; 1.6-2.2x the fp32 GEMM at 512-2,048 rows, 3-4x at 64:
    bench/int4_prefill.py, Zen 3) and on AVX512-VNNI + VBMI CPUs without AMX (the vpdpbusd path;
    Zen 5, bf16 rows against the bf16 GEMM: 1.08-1.14x at 512-2,048 rows, 1.7x at 64; fp32 rows
    against the fp32 GEMM 2.8-7.6x: `bench/int4_prefill.py --dtype bf16`). AMX CPUs (Sapphire
    Rapids) keep their GEMM (AMX's bf16 tiles; unmeasured against the kernel), as do AVX512 CPUs
    without VNNI + VBMI (Skylake, Cascade Lake: the kernel's AVX2 path against their AVX512 GEMM,
    unmeasured). Zen 4 and Ice Lake run Zen 5's instructions (on Zen 4 at half width): the
    kernel, by the same measure, not measured there."""
    from qwen35.devices import cpu_flags, cpu_has_amx

    if "avx512f" not in cpu_flags():  # (QWEN35_CPU_ISA=avx2 hides the AVX512 and AMX ones)
        return True
    from qwen35.kernels import gemv

    mod = gemv.load_int4()
    return mod is not None and not cpu_has_amx() and mod.int4_vnni_supported()


def int4_rows_ours(mod, dtype: torch.dtype, x8: bool = False) -> bool:
    """Decode rows of `dtype` take our int4 kernel (module `mod`): with 8-bit activations (x8)
    and fp32 rows always, bf16 rows on AVX512-VBMI + BF16 CPUs or where torch's int4 kernel reads
    another layout than ours."""
    return (
        x8
        or dtype == torch.float32
        or mod.int4_fast_supported()
        or not torch_int4_layout()
    )


def int4_x8(x8: bool, group: int) -> bool:
    """Whether int4 products with groups of `group` inputs take 8-bit activations: x8 asked
    (Int4Linear.x8) and the groups are whole blocks of the rounding (formats.INT4_X8_BLOCK)."""
    return bool(x8) and group % formats.INT4_X8_BLOCK == 0


def int4_linear_many(xs: list, layers: list) -> torch.Tensor | None:
    """torch.cat([int4_linear(x_i, layer_i)]) for Int4Linear layers of one shape, bit for bit,
    in one kernel call (`linear_int4_many`: one parallel_for over all their blocks; a MoE layer's
    picked experts: bench/moe_decode.py); None where int4_linear would not take the kernel for
    them."""
    first = layers[0]
    sz = [m.scales_and_zeros.contiguous() for m in layers]
    x8 = int4_x8(first.x8, first.group)
    mod = int4_kernel_for(xs[0], sz[0], x8)
    if mod is None or max(_rows(v).shape[0] for v in xs) > INT4_MAX_ROWS:
        return None
    return mod.linear_int4_many([_rows(x).contiguous() for x in xs], [m.weight for m in layers],
                                sz, first.group, first.out_features, x8=x8)  # fmt: skip


INT4_ROW_BLOCK = 64  # our int4 layout interleaves rows in blocks of 64 (torch's with AVX512)


def _quantizer(load, w: torch.Tensor, scale_dtype):
    """The kernel module load() gives where its C++ quantizer takes w: a CPU matrix of fp32 /
    bf16 / fp16 weights, scales in fp32 or bf16; else None (the PyTorch formula runs)."""
    takes = (w.is_cpu and w.dim() == 2 and scale_dtype in (torch.float32, torch.bfloat16)
             and w.dtype in (torch.float32, torch.bfloat16, torch.float16))  # fmt: skip
    return load() if takes else None


def quantize_fp8(w: torch.Tensor, block=(formats.BLOCK, formats.BLOCK),
                 scale_dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """formats.quantize_fp8_blocks(w, block, scale_dtype) by fp8_cpu.cpp's `fp8_quantize`
    where it runs (CPU weights of fp32 / bf16 / fp16, bf16 / fp32 scales; the same bits for
    finite weights: tested), e.g. `qwen35 quantize --to fp8`: 1024 x 2048 in ~0.7 ms vs ~4."""
    from qwen35.kernels import fp8 as kern

    if (mod := _quantizer(kern.load, w, scale_dtype)) is not None:
        return tuple(mod.fp8_quantize(w, block[0], block[1], scale_dtype))
    return formats.quantize_fp8_blocks(w, block, scale_dtype)


def quantize_int8(w: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8, scale [N] in dtype): our `int8_quantize` kernel where it
    runs (as quantize_int4), else formats.quantize_int8_rows (the same bits: tested)."""
    from qwen35.kernels import gemv

    if (mod := _quantizer(gemv.load, w, dtype)) is not None:
        return tuple(mod.int8_quantize(w, dtype))
    return formats.quantize_int8_rows(w, dtype)


def quantize_int6(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed, scales): our `int6_quantize` kernel where it runs (as quantize_int4),
    else formats.quantize_int6_groups (the same bits: tested)."""
    from qwen35.kernels import gemv

    blocks = w.dim() == 2 and w.shape[1] % formats.INT6_BLOCK == 0  # (else the formula's error)
    if blocks and (mod := _quantizer(gemv.load_int6, w, torch.bfloat16)) is not None:
        return tuple(mod.int6_quantize(w))
    return formats.quantize_int6_groups(w)


def quantize_int4(w: torch.Tensor, group: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed [N, K/2] uint8, scales_and_zeros [K/group, N, 2] in dtype): our
    `int4_quantize` kernel where it runs (CPU, fp32 / bf16 / fp16 weights, fp32 / bf16 scales),
    else its PyTorch twin formats.quantize_int4_groups + pack_int4 (the same bits: tested). The
    kernel is what makes loading with `--quantization int4` bound by the reading, not by this:
    1024 x 2048 bf16 in ~2 ms vs ~10-14 (Zen 3, 2 threads; Qwen3.5-35B-A3B is 17,000 of them)."""
    from qwen35.kernels import gemv

    if (mod := _quantizer(gemv.load_int4, w, dtype)) is not None:
        return tuple(mod.int4_quantize(w, group, dtype))
    q, sz = formats.quantize_int4_groups(w, group, dtype)
    return pack_int4(q), sz


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int32 or uint8 in [0, 15] (N % 64 == 0) -> [N, K/2] uint8: per block of 64 rows the
    bytes are K-major, row d in the low nibble and row d + 32 in the high one. That is torch's
    CPU int4 layout where torch runs its AVX512 code; with AVX2 (e.g. AMD Zen 3) torch packs
    blocks of 32 rows instead, so the packing is ours and torch's kernel is used only where its
    layout is this one (`torch_int4_layout`)."""
    n, k = q.shape
    b = q.reshape(n // INT4_ROW_BLOCK, 2, INT4_ROW_BLOCK // 2, k)  # [nb, lo | hi, 32, K]
    byte = (b[:, 0] | (b[:, 1] << 4)).to(torch.uint8)  # [nb, 32, K]
    return byte.transpose(1, 2).contiguous().view(n, k // 2)


# the group sizes torch's `_weight_int4pack_mm_for_cpu` takes; other groups (layers whose inputs
# are no multiple of 32) run our kernel, or the PyTorch reference without it
TORCH_INT4_GROUPS = (32, 64, 128, 256)


def torch_int4_takes(group: int) -> bool:
    """Whether torch's `_weight_int4pack_mm_for_cpu` runs our packed weights in groups of
    `group` here: it reads our layout and takes that group size."""
    return group in TORCH_INT4_GROUPS and torch_int4_layout()


@functools.cache
def torch_int4_layout() -> bool:
    """Whether torch packs (and its `_weight_int4pack_mm_for_cpu` reads) our layout on this CPU:
    its packing of a probe equals ours (torch picks the layout by the CPU capability it runs,
    ATEN_CPU_CAPABILITY included)."""
    q = (torch.arange(INT4_ROW_BLOCK)[:, None] * 7 + torch.arange(8)[None, :] * 3) % 16
    q = q.to(torch.int32)
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return False
    return theirs.shape == (INT4_ROW_BLOCK, 4) and torch.equal(theirs, pack_int4(q))


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of pack_int4 for N % 64 == 0: per block of 64 rows the bytes are K-major,
    row d in the low nibble and row d + 32 in the high one. -> [N, K] int32."""
    b = packed.reshape(n // INT4_ROW_BLOCK, k, INT4_ROW_BLOCK // 2).to(torch.int32)
    lo, hi = (b & 15).transpose(1, 2), (b >> 4).transpose(1, 2)  # [nb, 32, K] each
    return torch.cat([lo, hi], dim=1).reshape(n, k)
