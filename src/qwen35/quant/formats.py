"""The quantized weight formats as plain PyTorch: quantize and dequantize, the references every
fast path is tested against.

- block FP8 (the official Qwen releases): e4m3 weights, one scale per 128x128 block,
  `weight_scale_inv` [ceil(out/128), ceil(in/128)] = amax(block) / 448, W = q * scale;
- int8 weight-only: symmetric per output channel, scale = amax(row) / 127, W = q * scale;
- int4 weight-only: asymmetric per output channel and group of `group` inputs (torch's CPU
  int4 layout): W = (q - 8) * scale + zero with q in [0, 15];
- int6 (lm_head under int4): symmetric per output row and group of 32 inputs, scale = amax / 31
  in bf16, W = q * scale with q in [-31, 31], 48 bytes per two groups (kernels/int6_cpu.cpp).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
BLOCK = 128
# inputs a one-row FP8 block spans that the FP8 kernels take (a 4-bit checkpoint's group held
# exactly: fp8_on_lattice; the GPU GEMV / GEMM / MoE chunk by it)
FP8_ROW_WIDTHS = (32, 64, 128)


class Lattice(NamedTuple):
    """A source file's 4-bit values as they are stored (a hint to int4: quant/apply.py
    _int_linear): value = zero + step * code, code in [0, 15], step and zero [..., in / g] fp32
    per group of g inputs (g = in / groups: 32 for GGUF's blocks, a compressed-tensors
    checkpoint's group size), codes [..., in] uint8 (None: found from the values)."""

    step: torch.Tensor
    zero: torch.Tensor
    codes: torch.Tensor | None


class Int8Rows(NamedTuple):
    """A source file's 8-bit values per output row (a hint to int8 / int4): value = q * scale,
    q [..., out, in] int8, scale [..., out] fp32."""

    q: torch.Tensor
    scale: torch.Tensor


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """w [out, in] zero-padded to whole blocks, viewed [nbo, bo, nbi, bi]."""
    out, inp = w.shape
    bo, bi = block
    nbo, nbi = -(-out // bo), -(-inp // bi)
    pad = torch.zeros(nbo * bo, nbi * bi, dtype=torch.float32, device=w.device)
    pad[:out, :inp] = w
    return pad.view(nbo, bo, nbi, bi), nbo, nbi


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK), scale_dtype=torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q [out, in] float8_e4m3fn, scale_inv [ceil(out/bo), ceil(in/bi)]).

    scale = amax(|block|) / 448, rounded to scale_dtype first so that q is computed against the
    scale that is stored (dequantising gives the closest values the stored scale allows)."""
    out, inp = w.shape
    b, nbo, nbi = _blocks(w.float(), block)
    amax = b.abs().amax(dim=(1, 3))  # [nbo, nbi]
    scale = (amax / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    q = (b / scale.float()[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(nbo * block[0], nbi * block[1])[:out, :inp].to(FP8_DTYPE)
    return q.contiguous(), scale


def expand_block_scales(scale: torch.Tensor, shape, block=(BLOCK, BLOCK)) -> torch.Tensor:
    """scale [nbo, nbi] -> [out, in] fp32 (each block's scale repeated over the block)."""
    out, inp = shape
    s = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[:out, :inp]


def dequantize_fp8_blocks(
    q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, block=(BLOCK, BLOCK)
) -> torch.Tensor:
    """q [out, in] fp8, scale_inv [nbo, nbi] -> W [out, in] in dtype (product in fp32)."""
    return (q.float() * expand_block_scales(scale, q.shape, block)).to(dtype)


def quantize_int8_rows(w: torch.Tensor, scale_dtype=torch.bfloat16, chunk: int = 1 << 22):
    """w [out, in] -> (q [out, in] int8, scale [out]); symmetric, amax / 127 per row.

    Rows go in chunks of about `chunk` weights: the fp32 temporaries of the whole matrix would
    be ~12 bytes a weight (a 27B model's tied embedding: ~15 GB beside the model)."""
    out = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(out, dtype=scale_dtype, device=w.device)
    step = max(1, chunk // max(1, w.shape[1]))
    for r in range(0, out, step):
        w32 = w[r : r + step].to(torch.float32, copy=True)  # a copy: divided in place below
        s = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(scale_dtype)
        q[r : r + step] = torch.round(w32.div_(s.float()[:, None])).clamp_(-127, 127)
        scale[r : r + step] = s
    return q, scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16):
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_int4_groups(w: torch.Tensor, group: int, dtype=torch.bfloat16, chunk: int = 1 << 22):
    """w [out, in] -> (q [out, in] int32 in [0, 15], scales_and_zeros [in/group, out, 2]).

    Asymmetric min/max per (row, group) in torch's CPU int4 convention:
    W = (q - 8) * scale + zero, i.e. zero = min + 8 * scale."""
    out, inp = w.shape
    q = torch.empty(out, inp, dtype=torch.int32, device=w.device)
    sz = torch.empty(inp // group, out, 2, dtype=dtype, device=w.device)
    step = max(1, chunk // max(1, inp))  # rows per chunk: small fp32 temporaries, as int8's
    for r in range(0, out, step):
        g = w[r : r + step].float().view(-1, inp // group, group)
        lo, hi = g.amin(-1), g.amax(-1)  # [rows, ngroups]
        scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(dtype).float()
        zero = (lo + 8 * scale).to(dtype).float()
        qc = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
        q[r : r + step] = qc.view(-1, inp)
        sz[:, r : r + step] = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [ng, rows, 2]
    return q, sz


def int4_on_lattice(
    w: torch.Tensor | None, step: torch.Tensor, zero: torch.Tensor, dtype=torch.bfloat16,
    codes: torch.Tensor | None = None,
):
    """w [out, in] whose groups of g inputs already lie on 16-level lattices w = zero + step * q,
    q in [0, 15] (a GGUF file's Q4_0 / Q4_1 / Q4_K blocks, g = 32; a compressed-tensors
    checkpoint's groups; step, zero [out, in/g]) -> the int4 groups of g that hold those very
    values (q [out, in] int32, scales_and_zeros [in/g, out, 2] in dtype): scale = step, zero +
    8 * step in torch's convention; only the scales' rounding to dtype differs from the lattice
    (requantizing by min / max would pick another grid whenever a group does not reach both
    ends). codes: the q themselves (the file's, [out, in] uint8), so that w is not needed (None)
    and no q is found again; q is then uint8)."""
    g = (codes if codes is not None else w).shape[-1] // step.shape[-1]
    step, zero = step.float(), zero.float()
    neg = step < 0  # (Q4_0's d takes the sign of the group's extreme) the same lattice upside down
    zero = torch.where(neg, zero + 15 * step, zero)
    step = step.abs()
    if codes is not None:  # (kept in uint8: a quarter of int32's bytes to pack)
        q = codes
        if bool(neg.any()):
            q = torch.where(neg.repeat_interleave(g, 1), 15 - q, q)
    else:
        s = step.repeat_interleave(g, 1)
        z = zero.repeat_interleave(g, 1)
        q = torch.where(s > 0, (w.float() - z) / s.clamp(min=1e-30), torch.zeros_like(s))
        q = q.round_().clamp_(0, 15).to(torch.int32)
    sz = torch.stack([step, zero + 8 * step], -1).transpose(0, 1)
    return q, sz.to(dtype).contiguous()


def fp8_on_lattice(hint, block) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Lattice (step, zero, codes: [..., out, in / L], [..., out, in]) as e4m3 weights and
    fp32 scales in `block`s of one row and bi = L inputs (32, 64 or 128), exactly: each value is
    step * (code + zero / step), an integer of at most 16 (exact in e4m3) times its group's
    step, so where the lattices are bi inputs wide and zero / step is integral (compressed-tensors', GPTQ's, AWQ's
    zero points) the weight is q = code + zero / step, the scale the step. None otherwise (a
    GGUF Q4_K's zero points are not multiples of its steps; lattices narrower than the block):
    the values are quantized instead."""
    if not isinstance(hint, Lattice) or hint.codes is None or block[0] != 1:
        return None
    step, zero = hint.step.float(), hint.zero.float()
    if hint.codes.shape[-1] != step.shape[-1] * block[1] or bool((step == 0).any()):
        return None
    r = zero / step
    shift = r.round()
    if not bool(((r - shift).abs() <= 1e-3).all()):
        return None
    q = hint.codes.to(torch.int16).view(*step.shape, block[1]) + shift.to(torch.int16)[..., None]
    if int(q.abs().max()) > 16:
        return None
    return q.view(hint.codes.shape).to(FP8_DTYPE), step.contiguous()


def dequantize_int4_groups(q: torch.Tensor, sz: torch.Tensor, group: int, dtype=torch.bfloat16):
    """q [out, in] int32 in [0, 15], scales_and_zeros [in/group, out, 2] -> W [out, in]."""
    s = sz[..., 0].float().t().repeat_interleave(group, 1)  # [out, in]
    z = sz[..., 1].float().t().repeat_interleave(group, 1)
    return ((q.float() - 8) * s + z).to(dtype)


# (plan/params.py INT6_BLOCK_BYTES counts a block's two bf16 scales too: 48 + 4)
INT6_GROUP, INT6_BLOCK, INT6_CODE_BYTES, INT6_MAX = 32, 64, 48, 31


def quantize_int6_groups(w: torch.Tensor, chunk: int = 1 << 22):
    """w [out, in] (in % 64 == 0) -> (packed [out, in / 64 * 48] uint8, scales [out, in / 32]
    bf16): per group of 32 inputs scale = amax / 31 rounded to bf16, q = round(w / scale) in
    [-31, 31], stored u = q + 32 in blocks of two groups (64 inputs, 48 bytes): each group's 16
    bytes of low nibbles (byte j: input j low, j + 16 high), then 16 bytes of the top 2 bits
    (byte r: bits 0-1 input r of the first group, 2-3 input r of the second, 4-5 input 16 + r
    of the first, 6-7 input 16 + r of the second): kernels/int6_cpu.cpp unpacks a block with a
    few 256-bit ops."""
    out, inp = w.shape
    if inp % INT6_BLOCK:
        raise ValueError(f"int6 needs inputs in blocks of {INT6_BLOCK}, got {inp}")
    nb = inp // INT6_BLOCK
    packed = torch.empty(out, nb * INT6_CODE_BYTES, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out, 2 * nb, dtype=torch.bfloat16, device=w.device)
    step = max(1, chunk // inp)
    for r in range(0, out, step):
        g = w[r : r + step].float().view(-1, 2 * nb, INT6_GROUP)
        s = (g.abs().amax(-1) / INT6_MAX).clamp(min=1e-30).to(torch.bfloat16)
        u = (torch.round(g / s.float()[..., None]).clamp_(-INT6_MAX, INT6_MAX) + 32).to(torch.uint8)
        u = u.view(len(g), nb, 2, 2, 16)  # [rows, block, group, half, r]
        low, top = u & 0x0F, u >> 4
        nib = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).flatten(2)  # [rows, block, 32]
        hb = (top[:, :, 0, 0] | (top[:, :, 1, 0] << 2) | (top[:, :, 0, 1] << 4)
              | (top[:, :, 1, 1] << 6))  # [rows, block, 16]  # fmt: skip
        packed[r : r + step] = torch.cat([nib, hb], -1).view(len(g), -1)
        scales[r : r + step] = s
    return packed, scales


def int6_codes(packed: torch.Tensor) -> torch.Tensor:
    """packed [out, nb * 48] uint8 -> q [out, nb * 64] int8 in [-31, 31] (the stored values)."""
    out = packed.shape[0]
    b = packed.view(out, -1, INT6_CODE_BYTES)
    nib, hb = b[..., :32].reshape(out, -1, 2, 16), b[..., 32:]  # [out, block, group, r]
    low = torch.stack([nib & 0x0F, nib >> 4], 3)  # [out, block, group, half, r]
    top = torch.stack([torch.stack([(hb >> (2 * (2 * half + grp))) & 3 for half in (0, 1)], 2)
                       for grp in (0, 1)], 2)  # fmt: skip
    return ((low | (top << 4)).to(torch.int16) - 32).to(torch.int8).view(out, -1)


def dequantize_int6(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.float32):
    """packed, scales (quantize_int6_groups) -> W [out, in] in dtype (products in fp32)."""
    q = int6_codes(packed).float().view(packed.shape[0], -1, INT6_GROUP)
    return (q * scales.float()[..., None]).view(packed.shape[0], -1).to(dtype)


def int6_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor):
    """The PyTorch twin of kernels/int6_cpu.cpp linear_int6: x [M, K] rounded to 8 bits per 32
    inputs (quantize_rows_i16(x, 32, 127)) @ W^T, in fp32 (the kernel sums in another order:
    equal within fp32 rounding)."""
    xh = quantize_rows_i16(x, INT6_GROUP, INT4_X8_MAX)
    return F.linear(xh, dequantize_int6(packed, scales))


INT4_X_MAX = 32512  # kernels/int4_cpu.cpp kXqMax: |xq| where (xq + 128) >> 8 is a signed byte


def quantize_rows_i16(x: torch.Tensor, group: int, qmax: int = INT4_X_MAX) -> torch.Tensor:
    """x [M, K] -> x^ [M, K] fp32 as the AVX2 int4 / int8 GEMVs see it (kernels/int4_cpu.cpp,
    gemv_cpu.cpp): per row and group of `group` inputs (the last one shorter when K is not a
    multiple), x rounded to a multiple of xs = amax / qmax (|x - x^| <= amax / (2 qmax); int4's
    qmax 32512, int8's 32767). A group with a non-finite value becomes NaN; a group of zeros, or
    of values so small (amax < ~1e-34) that qmax / amax overflows, becomes zeros."""
    m, k = x.shape
    pad = -k % group
    xg = F.pad(x.float(), (0, pad)).reshape(m, (k + pad) // group, group)
    amax = xg.abs().amax(-1, keepdim=True)
    # inf for zero (or below ~1e-34) groups: those become zeros. A true division, as the kernels'
    # qmax / amax (torch's `qmax / amax` multiplies by 1 / amax: a different rounding, which
    # turned exact ties of x * inv the other way)
    inv = torch.full_like(amax, float(qmax)) / amax
    live = torch.isfinite(inv)
    xq = torch.round(xg * torch.where(live, inv, 0)).clamp_(-qmax, qmax)
    xh = xq * torch.where(live, amax / qmax, 0)
    xh = torch.where(torch.isfinite(amax), xh, torch.full_like(xh, float("nan")))
    return xh.reshape(m, k + pad)[:, :k]


INT8_X_GROUP = 128  # kernels/gemv_cpu.cpp kI16Group
INT8_X_MAX = 32767  # kernels/gemv_cpu.cpp kI16Max


def int8_linear_i16_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The PyTorch twin of the int8 GEMV on CPUs without AVX512: x [M, K] @ (q [N, K] int8 *
    scale [N])^T in fp32, x rounded to 16 bits per group of 128 inputs (quantize_rows_i16)."""
    xh = quantize_rows_i16(x, INT8_X_GROUP, INT8_X_MAX)
    return F.linear(xh, q.float()) * scale.float()


INT4_X8_MAX, INT4_X8_BLOCK = 127, 32  # the int4 GEMVs' 8-bit activations (x8: int4_cpu.cpp)


def int4_linear_i16_reference(
    x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int, x8: bool = False
) -> torch.Tensor:
    """The PyTorch twin of the integer int4 GEMVs: x [M, K] @ W^T [K, N] fp32 with x quantised as
    quantize_rows_i16 does, except that each group's zero point multiplies the exact sum of x
    (the kernel keeps it: W = (q - 8) * scale + zero, y = sum x^ (q - 8) scale + zero sum x).
    x8: the 8-bit activations of the AVX2 and AVX512-VNNI x8 paths (x rounded per block of 32
    inputs, not per group, to |xq| <= 127), whose zero term multiplies the rounded x's sum: y =
    x^ @ W; else the 16-bit AVX2 path."""
    m, k = x.shape
    w = dequantize_int4_groups(q, sz, group, torch.float32)  # [N, K]
    if x8:
        return F.linear(quantize_rows_i16(x, INT4_X8_BLOCK, INT4_X8_MAX), w)
    xh = quantize_rows_i16(x, group)
    ng = k // group
    diff = x.float().reshape(m, ng, group).sum(-1) - xh.reshape(m, ng, group).sum(-1)  # [M, ng]
    return F.linear(xh, w) + diff @ sz[..., 1].float()  # zeros [ng, N]
