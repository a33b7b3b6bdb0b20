"""The sparse MoE block of a decode step in three Triton kernels (GPU), for a few tokens.

At decode a token picks k of E experts (35B-A3B: 8 of 256) and each picked expert sees one or
two rows. The grouped GEMM path (ops/moe.py) sorts the (token, expert) pairs, counts, offsets,
gathers and scatters: ~20 launches a layer around two `torch._grouped_mm` calls, which on a
captured decode step cost more than the weights they read. Here, for up to ops/moe.py's
`FUSED_MAX_TOKENS` tokens:

- `_router_kernel` (one program per token): softmax of the router logits in fp32, the top k
  (first index on ties), renormalised, cast to the model dtype: what `SparseMoE.route` does.
- `_gate_up_kernel` (per (token, choice) pair x block of BN intermediate rows): the expert's
  gate and up rows against the token's hidden state (fp32 sums, rounded to the model dtype
  as a matmul output is), then silu(gate) * up rounded as `ops/pointwise.silu_mul` does.
- `_down_kernel` (per token x block of BN hidden rows): sum over the token's k choices of
  weight * (down rows . h), plus the shared expert: sigmoid(shared_expert_gate . x) * (its down
  rows . silu(gate) * up), its gate / up computed before: with the router's logits and the
  gate's logit in one matmul where the block packed them (layers/moe.py SparseMoE.pack), else
  the shared expert's packed matmul and the gate's dot here.
  fp32 throughout, rounded once (the reference rounds each expert's output, each product and
  each partial sum in the model dtype: results agree within those roundings).

A decode step reads each weight once, so these kernels are bound by how many loads are in
flight, not by arithmetic: the first version (one dot product per chunk, reduced across the
program's warps before the next chunk was loaded, one expert after another) kept ~4 KB in
flight per program, ~0.5 MB over an H200's 132 SMs where ~3.4 MB (bandwidth x latency) is
needed, the likely reason the 35B-A3B decode ran at 30% of its roofline (session note of
2026-12-04; counted in the compiled code by bench/gpu_kernel_resources.py, not yet timed).
Now: shapes are constexprs and the gate_up loop over H is unrolled; products are summed
elementwise into a [BN, BK] tile and reduced once at the end (no barrier between chunks); the
vectors are loaded in the weight tile's layout (no shared-memory round trip); the down kernel
loads all k experts' rows of a chunk as one [k, BN, BK] tile; BN = 4 rows per program gives
~4 programs per SM. sm_90 compiles: ~35 loads of 8 B per thread in flight (gate_up) and
~12-15 of 16 B (down), against 2 before.
FP8 experts (the official e4m3 releases, 128 x 128 block scales) are read as stored: each
128-wide chunk of a row's dot product is multiplied by its block's scale (activations stay in
the model dtype, unlike the block-FP8 GEMM, which quantises them per 128-group), as bytes
(kernels/triton_fp8.py: the kernels build on GPUs before sm_89 too). Such MoE blocks also
become capturable in a CUDA graph (the per-expert FP8 loop reads counts on the host).

Each weight row is read once per pair that uses it (GEMV-style, no tensor cores): at a few
tokens the block is memory-bound and the pairs rarely share an expert. Reference:
`SparseMoE.forward` with the grouped or looped experts; tests/test_triton_kernels.py compares
them (also under TRITON_INTERPRET=1 on a CPU). Block sizes are unmeasured on a GPU
(bench/gpu_kernels.py compares some).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from qwen35.kernels.triton_fp8 import UNSCALE, bits, e4m3_to_fp16
from qwen35.kernels.unavailable import launcher

if TYPE_CHECKING:
    from qwen35.ops.moe import ExpertWeights, SharedExpert

# rows per program, reduction chunk: small tiles and many programs (decode is memory-bound:
# what matters is how many loads are in flight, bench/gpu_kernels.py compares some)
BN, BK = 4, 128
# the down kernel unrolls its loop over I where k (rounded up to a power of two) x I is at most
# this (35B-A3B: 8 x 512, 122B-A10B: 8 x 1024); above (397B-A17B: 16 x 1024) the unrolled
# loop spills registers on sm_90
UNROLL_MAX = 8192
FP8_BLOCK = 128  # the official FP8 releases' scale blocks (128 x 128; BK is a block's width)


@triton.jit
def _router_kernel(L, stride_lt, IDX, TW, E, K_TOP: tl.constexpr, BE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    m = e < E
    logit = tl.load(L + t * stride_lt + e, mask=m, other=float("-inf")).to(tl.float32)
    p = tl.exp(logit - tl.max(logit, 0))
    p = tl.where(m, p, 0.0)
    prob = p / tl.sum(p, 0)
    # the k largest, first index on ties; a taken one drops to -1
    left = tl.where(m, prob, -1.0)
    total = 0.0
    for _ in tl.static_range(K_TOP):
        best = tl.max(left, 0)
        i = tl.min(tl.where(left == best, e, BE), 0)
        total += best
        left = tl.where(e == i, -1.0, left)
    left = tl.where(m, prob, -1.0)  # again, now writing renormalised weights in order
    for j in tl.static_range(K_TOP):
        best = tl.max(left, 0)
        i = tl.min(tl.where(left == best, e, BE), 0)
        tl.store(IDX + t * K_TOP + j, i.to(tl.int64))
        tl.store(TW + t * K_TOP + j, (best / total).to(TW.dtype.element_ty))
        left = tl.where(e == i, -1.0, left)


@triton.jit
def _gate_up_kernel(
    X, stride_xt, IDX, W, stride_we, stride_wn, WS, stride_wse, stride_wsr, HBUF, stride_hp, I,
    NBH, H: tl.constexpr, K_TOP: tl.constexpr, FP8: tl.constexpr, BO: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = n < I
    t = pair // K_TOP
    e = tl.load(IDX + pair).to(tl.int64)
    gate_rows = W + e * stride_we + n[:, None] * stride_wn
    up_rows = gate_rows + I * stride_wn
    # FP8: one fp32 scale per 128 x 128 block (BK == 128): gate blocks first, then up blocks
    scales = WS + e * stride_wse + (n // BO) * stride_wsr
    # products summed elementwise over the chunks, reduced once at the end: no reduction (and
    # no barrier) between the chunks' loads, which the unrolled loop then issues together
    acc_g = tl.zeros([BN, BK], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in tl.static_range(0, H, BK):  # unrolled: the chunks' loads issue together
        k = k0 + tl.arange(0, BK)
        mk = k < H
        mw = mn[:, None] & mk[None, :]
        # x loaded per weight element: in the weights' layout (no shared memory, no barrier)
        x = tl.load(X + t * stride_xt + (k[None, :] + 0 * n[:, None]), mask=mw,
                    other=0.0).to(tl.float32)  # fmt: skip
        g = _w32(tl.load(gate_rows + k[None, :], mask=mw, other=0), FP8) * x
        u = _w32(tl.load(up_rows + k[None, :], mask=mw, other=0), FP8) * x
        if FP8:
            g *= (tl.load(scales + k0 // BK, mask=mn, other=0.0) * UNSCALE)[:, None]
            u *= (tl.load(scales + NBH * stride_wsr + k0 // BK, mask=mn, other=0.0) * UNSCALE)[:, None]
        acc_g += g
        acc_u += u
    acc_g = tl.sum(acc_g, 1)
    acc_u = tl.sum(acc_u, 1)
    dt = HBUF.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)  # the matmul's output in the model dtype
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu, rounded as silu_mul does
    u = acc_u.to(dt).to(tl.float32)
    tl.store(HBUF + pair * stride_hp + n, (s * u).to(dt), mask=mn)


@triton.jit
def _w32(w, FP8: tl.constexpr):
    """Weights as loaded -> fp32; FP8: e4m3 bytes, value / UNSCALE (kernels/triton_fp8.py)."""
    if FP8:
        return e4m3_to_fp16(w).to(tl.float32)
    return w.to(tl.float32)


@triton.jit
def _down_chunk(acc, k0, rows, vecs, w, e, n, mj, mn, m2, DS, stride_dse, stride_dsr,
                I: tl.constexpr, FP8: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """acc [KP, BN, BK] + the k experts' products of one chunk of I (see _down_kernel)."""
    k = k0 + tl.arange(0, BK)[None, None, :]
    m3 = m2 & (k < I)
    h = tl.load(vecs + k, mask=m3, other=0.0).to(tl.float32) * w[:, None, None]
    part = _w32(tl.load(rows + k, mask=m3, other=0), FP8) * h
    if FP8:  # one fp32 scale per 128 x 128 block (BK == 128)
        sc = tl.load(DS + e[:, None] * stride_dse + (n // BO)[None, :] * stride_dsr + k0 // BK,
                     mask=mj[:, None] & mn[None, :], other=0.0)  # fmt: skip
        part *= (sc * UNSCALE)[:, :, None]
    return acc + part


@triton.jit
def _down_kernel(
    HBUF, stride_hp, IDX, TW, D, stride_de, stride_dn, DS, stride_dse, stride_dsr,
    X, stride_xt, SGW, stride_sgw, SG, stride_sg, SU, stride_su, SD, stride_sdn, SDS, stride_sdsr,
    Y, stride_yt, H: tl.constexpr, I: tl.constexpr, IS: tl.constexpr,
    K_TOP: tl.constexpr, KP: tl.constexpr, FP8: tl.constexpr, HAS_SHARED: tl.constexpr,
    SD_FP8: tl.constexpr, GATE_LOGIT: tl.constexpr, UNROLL: tl.constexpr, BO: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = n < H
    dt = Y.dtype.element_ty
    # all k choices at once: a [KP, BN, BK] tile per chunk of I (KP: K_TOP rounded up to a power
    # of two), so that every expert's loads issue together instead of one expert after another
    j = tl.arange(0, KP)
    mj = j < K_TOP
    pair = t * K_TOP + j
    e = tl.load(IDX + pair, mask=mj, other=0).to(tl.int64)
    w = tl.load(TW + pair, mask=mj, other=0.0).to(tl.float32)  # routing weights
    rows = D + e[:, None, None] * stride_de + n[None, :, None] * stride_dn  # [KP, BN, 1]
    vecs = HBUF + pair[:, None, None] * stride_hp + 0 * n[None, :, None]  # (in the tile's layout)
    m2 = mj[:, None, None] & mn[None, :, None]
    acc = tl.zeros([KP, BN, BK], dtype=tl.float32)
    if UNROLL:  # the chunks' loads issue together (where the registers allow: KP x I small)
        for k0 in tl.static_range(0, I, BK):
            acc = _down_chunk(acc, k0, rows, vecs, w, e, n, mj, mn, m2, DS, stride_dse,
                              stride_dsr, I, FP8, BO, BK)  # fmt: skip
    else:
        for k0 in range(0, I, BK):
            acc = _down_chunk(acc, k0, rows, vecs, w, e, n, mj, mn, m2, DS, stride_dse,
                              stride_dsr, I, FP8, BO, BK)  # fmt: skip
    out = tl.sum(tl.sum(acc, 2), 0)  # [BN]
    if HAS_SHARED:
        if GATE_LOGIT:  # the shared expert's gate logit, from the router's matmul
            logit = tl.load(SGW + t * stride_sgw).to(tl.float32)
        else:  # one dot over H (every program of the token repeats it)
            sg = tl.zeros([BK], dtype=tl.float32)
            for k0 in tl.static_range(0, H, BK):  # unrolled: the chunks' loads issue together
                kk = k0 + tl.arange(0, BK)
                mk = kk < H
                x = tl.load(X + t * stride_xt + kk, mask=mk, other=0.0).to(tl.float32)
                sg += tl.load(SGW + kk, mask=mk, other=0.0).to(tl.float32) * x
            logit = tl.sum(sg, 0).to(dt).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-logit))).to(dt).to(tl.float32)
        # its down rows against silu(gate_proj) * up, computed chunk by chunk as silu_mul
        # rounds it (loaded per weight element, as above)
        srows = SD + n[:, None] * stride_sdn
        zero = 0 * n[:, None]
        sacc = tl.zeros([BN, BK], dtype=tl.float32)
        for k0 in tl.static_range(0, IS, BK):
            kk = k0 + tl.arange(0, BK)[None, :]
            mw = mn[:, None] & (kk < IS)
            g = tl.load(SG + t * stride_sg + kk + zero, mask=mw, other=0.0).to(tl.float32)
            u = tl.load(SU + t * stride_su + kk + zero, mask=mw, other=0.0).to(tl.float32)
            hh = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
            part = _w32(tl.load(srows + kk, mask=mw, other=0), SD_FP8) * hh
            if SD_FP8:
                part *= (tl.load(SDS + (n // BO) * stride_sdsr + k0 // BK, mask=mn,
                                 other=0.0) * UNSCALE)[:, None]  # fmt: skip
            sacc += part
        out += gate * tl.sum(sacc, 1)
    tl.store(Y + t * stride_yt + n, out.to(dt), mask=mn)


@launcher("triton_moe")
def route(logits: torch.Tensor, top_k: int, dtype: torch.dtype):
    """Router logits [T, E] -> (top_w [T, k] in dtype, top_idx [T, k] int64)."""
    T, E = logits.shape
    assert logits.stride(1) == 1
    idx = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    tw = torch.empty(T, top_k, dtype=dtype, device=logits.device)
    if T:
        _router_kernel[(T,)](logits, logits.stride(0), idx, tw, E, K_TOP=top_k,
                             BE=triton.next_power_of_2(E))  # fmt: skip
    return tw, idx


@launcher("triton_moe")
def sparse_moe(
    x: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E] (model dtype)
    top_k: int,
    experts: ExpertWeights,
    shared: SharedExpert | None = None,
    block_n: int = BN,  # rows per program (bench/gpu_kernels.py compares some)
    block_k: int = BK,  # reduction chunk (FP8 weights: 128, their scale blocks)
) -> torch.Tensor:
    """The MoE block's output [T, H] in x's dtype."""
    T, H = x.shape
    gu, dn = experts.gate_up, experts.down
    E, two_i, _ = gu.shape
    Ii = two_i // 2
    fp8 = experts.gate_up_scale is not None
    bk = experts.block_k if fp8 else block_k  # FP8: a chunk is a scale block's inputs
    bo = experts.block_o  # FP8: weight rows a scale covers (128, or 1)
    assert x.stride(1) == 1 and gu.stride(2) == 1 and dn.stride(2) == 1
    tw, idx = route(router_logits, top_k, x.dtype)
    hbuf = torch.empty(T * top_k, Ii, dtype=x.dtype, device=x.device)
    y = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    gs = experts.gate_up_scale if fp8 else x  # (unread without FP8)
    ds = experts.down_scale if fp8 else x
    if fp8:
        assert gs.stride(2) == 1 and ds.stride(2) == 1
    if fp8:  # e4m3 read as bytes (kernels/triton_fp8.py): builds before sm_89 too
        gu, dn = bits(gu), bits(dn)
    _gate_up_kernel[(T * top_k, triton.cdiv(Ii, block_n))](
        x, x.stride(0), idx, gu, gu.stride(0), gu.stride(1), gs, gs.stride(0),
        gs.stride(1) if fp8 else 0, hbuf, hbuf.stride(0), Ii, triton.cdiv(Ii, bo), H=H,
        K_TOP=top_k, FP8=fp8, BO=bo, BN=block_n, BK=bk,
    )  # fmt: skip
    sh = shared
    gate_logit = sh is not None and sh.gate_logit is not None
    if sh is not None:
        sd_fp8 = sh.down_scale is not None
        assert sh.gate.stride(1) == 1 and sh.up.stride(1) == 1 and sh.down.stride(1) == 1
        sgw = sh.gate_logit if gate_logit else sh.gate_weight  # [T] (strided), or [1, H]
        assert gate_logit or sgw.is_contiguous()
        sg, su, sd = sh.gate, sh.up, sh.down
        sd = bits(sd) if sd_fp8 else sd
        sds = sh.down_scale if sd_fp8 else x
        is_ = sd.shape[1]
    else:  # unread (HAS_SHARED=False)
        sd_fp8, sgw, sg, su, sd, sds, is_ = False, x, x, x, x, x, 0
    kp = triton.next_power_of_2(top_k)
    _down_kernel[(T, triton.cdiv(H, block_n))](
        hbuf, hbuf.stride(0), idx, tw, dn, dn.stride(0), dn.stride(1), ds, ds.stride(0),
        ds.stride(1) if fp8 else 0, x, x.stride(0), sgw, sgw.stride(0) if gate_logit else 0, sg,
        sg.stride(0), su, su.stride(0), sd, sd.stride(0), sds, sds.stride(0) if sd_fp8 else 0, y,
        y.stride(0), H=H, I=Ii, IS=is_, K_TOP=top_k, KP=kp, FP8=fp8,
        HAS_SHARED=sh is not None, SD_FP8=sd_fp8, GATE_LOGIT=gate_logit,
        UNROLL=kp * Ii <= UNROLL_MAX, BO=bo, BN=block_n, BK=bk,
    )  # fmt: skip
    return y
