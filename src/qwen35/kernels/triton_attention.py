"""Paged causal attention in Triton: no gather of the context, K/V read in place from the block
cache (layout in engine/forward_batch.py: [num_blocks, block_size, nkv, hd]).

- `paged_decode_attention`: one query token per sequence. One program per (sequence, KV head)
  serves that head's `nh / nkv` query heads together (GQA: each K/V tile is read once), with an
  online softmax over tiles of BLOCK_T tokens; a token's block comes from the block table, so any
  block size works. Reads only device tensors (context lengths, block tables): capturable in a
  CUDA graph. Optionally multiplies the output by sigmoid(gate) (the attention output gate).
- `paged_prefill_attention`: the queries of one prefill chunk that continues a cached prefix
  (positions start_pos .. start_pos+Tq-1) over the whole cached context, causal.

Both compute in fp32 (scores, softmax, accumulator); P is cast to the model dtype for the P.V
product as FlashAttention does. fp8 (e4m3) caches (--kv-cache-dtype fp8) are widened to the model
dtype as each tile is read. fp32 inputs use IEEE fp32 dots (no TF32) so fp32 runs stay
comparable token for token with the PyTorch reference (ops/attention.py), which stays beside
them. Also runs under TRITON_INTERPRET=1 on a CPU (tests/test_triton_kernels.py, tests/test_interpret_engine.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen35.kernels.unavailable import launcher

BLOCK_T = 32  # key tokens per tile
# Triton's CPU interpreter computes bf16 dots wrongly (a 16x32 bf16 product came out ~1e10 off
# with triton 3.9); under it the kernels upcast K, V and Q to fp32 before their dots, so an
# interpreted bf16 run checks indexing, masking and the softmax, not the bf16 dot itself.
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_kv(X, blk, off, kvh, d, tmask, stride_b, stride_t, stride_h, UPCAST: tl.constexpr):
    """The [T, HD] K or V rows of head kvh at tokens (block blk, offset off); 0 where masked."""
    x = tl.load(X + blk[:, None] * stride_b + off[:, None] * stride_t + kvh * stride_h
                + d[None, :], mask=tmask[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend_tile(
    q, K, V, table, pos, tmask, ok, kvh, scale, m_i, l_i, acc,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    BS: tl.constexpr, HD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One tile of keys at positions pos [T] (tmask: in range; ok [R, T] or [1, T]: may be
    attended) for the query rows q [R, HD], head kvh; the block of each position from the block
    table row `table`. Online softmax in fp32: returns the updated running max m_i [R], sum l_i
    [R] and accumulator acc [R, HD]; a row that has attended to nothing yet stays at 0."""
    d = tl.arange(0, HD)
    blk = tl.load(table + pos // BS, mask=tmask, other=0).to(tl.int64)
    off = pos % BS
    # (.to(q.dtype): fp8 caches widened to the model dtype as read; a no-op otherwise)
    k = _load_kv(K, blk, off, kvh, d, tmask, stride_kb, stride_kt, stride_kh, UPCAST).to(q.dtype)
    s = tl.where(ok, _dot(q, tl.trans(k), IEEE) * scale, float("-inf"))  # [R, T]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with no key so far (prefill rows past Tq) keeps p = alpha = 0, not NaN; a decode
    # tile always holds a key (t0 < ctx), so there m_safe is m_new
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(V, blk, off, kvh, d, tmask, stride_vb, stride_vt, stride_vh, UPCAST).to(q.dtype)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


# run-time ints that change between calls are not specialised on (== 1, multiple of 16): one
# compiled variant serves them all, built by the engine's start-up check (engine/preflight.py)
# instead of a compile of a second or more in the middle of serving
@triton.jit(do_not_specialize=["SPLITS"])
def _decode_kernel(
    Q, K, V, O, G, PART, block_tables, context_lens, scale,
    stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_on, stride_oh, stride_gn, stride_gh, SPLITS,
    BS: tl.constexpr, REP: tl.constexpr, BLOCK_R: tl.constexpr, HD: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_GATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr, SPLIT_TOKENS: tl.constexpr, MAX_S: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, HD)
    t = tl.arange(0, BLOCK_T)
    rmask = r < REP
    heads = kvh * REP + r
    q = tl.load(Q + n * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    ctx = tl.load(context_lens + n)
    # this split's keys: a range of `_split_chunk(ctx)` tokens (the trailing splits may be empty)
    chunk = _split_chunk(ctx, SPLIT_TOKENS, MAX_S, BLOCK_T)
    start = split * chunk
    end = tl.minimum(ctx, start + chunk)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HD], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + t
        tmask = pos < end
        m_i, l_i, acc = _attend_tile(
            q, K, V, block_tables + n * stride_bt, pos, tmask, tmask[None, :], kvh, scale,
            m_i, l_i, acc, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            BS, HD, IEEE, UPCAST,
        )  # fmt: skip
    if not SPLIT:  # SPLITS == 1 (a runtime count otherwise: one compiled variant for all)
        _finish(acc / l_i[:, None], O, G, n, heads, d, rmask, stride_on, stride_oh, stride_gn,
                stride_gh, HAS_GATE)  # fmt: skip
    else:  # partial results [N, nh, SPLITS, HD + 2]: acc, then the running max and sum
        row = PART + ((n * (tl.num_programs(1) * REP) + heads) * SPLITS + split) * (HD + 2)
        tl.store(row[:, None] + d[None, :], acc, mask=rmask[:, None])
        tl.store(row + HD, m_i, mask=rmask)
        tl.store(row + HD + 1, l_i, mask=rmask)


@triton.jit
def _finish(out, O, G, n, heads, d, rmask, stride_on, stride_oh, stride_gn, stride_gh,
            HAS_GATE: tl.constexpr):  # fmt: skip
    """Store the attention output of rows `heads` (times sigmoid(gate), rounded as the gated
    reference rounds: output to the model dtype first)."""
    if HAS_GATE:
        gate = tl.load(G + n * stride_gn + heads[:, None] * stride_gh + d[None, :],
                       mask=rmask[:, None], other=0.0).to(tl.float32)  # fmt: skip
        out = out.to(O.dtype.element_ty).to(tl.float32) * tl.sigmoid(gate)
    tl.store(O + n * stride_on + heads[:, None] * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=rmask[:, None])  # fmt: skip


@triton.jit
def _split_chunk(ctx, SPLIT_TOKENS: tl.constexpr, MAX_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """Keys per split for a context of ctx tokens: SPLIT_TOKENS, more where ctx would need more
    than MAX_S splits. It depends on ctx alone, so a sequence's result does not depend on the
    batch, the grid or whether a CUDA graph runs it (split `s` holds the same keys)."""
    return tl.maximum(SPLIT_TOKENS, tl.cdiv(tl.cdiv(ctx, MAX_S), BLOCK_T) * BLOCK_T)


@triton.jit(do_not_specialize=["SPLITS"])
def _combine_kernel(
    PART, O, G, context_lens, stride_on, stride_oh, stride_gn, stride_gh, NH, SPLITS,
    HD: tl.constexpr, HAS_GATE: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
    MAX_S: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): its used splits' partial softmaxes merged in split order, as
    the online softmax merges tiles (one used split gives exactly the unsplit result)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HD)
    ctx = tl.load(context_lens + n)
    used = tl.cdiv(ctx, _split_chunk(ctx, SPLIT_TOKENS, MAX_S, BLOCK_T))
    row = PART + (n * NH + h) * SPLITS * (HD + 2)
    m = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, HD], tl.float32)
    for sp in range(0, used):
        m_s = tl.load(row + sp * (HD + 2) + HD + tl.zeros([1], tl.int32))
        l_s = tl.load(row + sp * (HD + 2) + HD + 1 + tl.zeros([1], tl.int32))
        acc_s = tl.load(row + sp * (HD + 2) + d)[None, :]
        m_new = tl.maximum(m, m_s)
        a = tl.exp(m - m_new)
        b = tl.exp(m_s - m_new)
        acc = acc * a[:, None] + acc_s * b[:, None]
        l_i = l_i * a + l_s * b
        m = m_new
    heads = h + tl.zeros([1], tl.int32)
    _finish(acc / l_i[:, None], O, G, n, heads, d, heads >= 0, stride_on, stride_oh, stride_gn,
            stride_gh, HAS_GATE)  # fmt: skip


# Split-K (flash-decoding): a decode step's programs are one per (sequence, KV head), too few to
# fill a GPU at long contexts (Qwen3.5-0.8B: 2 KV heads; at batch 1 and 32K tokens two SMs
# would stream 32 MB each). A context is cut into ranges of SPLIT_TOKENS (more per range above
# MAX_SPLITS ranges), each a program, partial softmaxes merged by `_combine_kernel`; the cut
# depends on the context length alone (batched == alone, graph == eager). The grid's split
# dimension covers the batch's largest possible context (a CUDA graph's: its capture width).
# Unmeasured on a GPU: the constants are first guesses (the CPU kernel cuts at 1,024).
MAX_SPLITS, SPLIT_TOKENS = 32, 512


def num_splits(max_context: int | None, split_tokens: int = SPLIT_TOKENS) -> int:
    """Programs per (sequence, KV head) that cover contexts up to max_context (1: no split)."""
    if not max_context:
        return 1
    return max(1, min(MAX_SPLITS, -(-max_context // split_tokens)))


@launcher("triton_attention")
def paged_decode_attention(
    q: torch.Tensor,  # [N, nh, hd]
    key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    context_lens: torch.Tensor,  # [N] int, tokens to attend (the new one included)
    scale: float,
    gate: torch.Tensor | None = None,  # [N, nh, hd]: out * sigmoid(gate) in q's dtype
    max_context: int | None = None,  # >= every context length: allows split-K
    split_tokens: int = SPLIT_TOKENS,  # tests: smaller ranges
) -> torch.Tensor:
    """Returns [N, nh, hd] in q's dtype."""
    N, nh, hd = q.shape
    bs, nkv = key_cache.shape[1], key_cache.shape[2]
    rep = nh // nkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = torch.empty(N, nh, hd, dtype=q.dtype, device=q.device)
    g = gate if gate is not None else o
    S = num_splits(max_context, split_tokens)
    part = torch.empty(N, nh, S, hd + 2, dtype=torch.float32, device=q.device) if S > 1 else o
    _decode_kernel[(N, nkv, S)](
        q, key_cache, value_cache, o, g, part, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), o.stride(0), o.stride(1), g.stride(0), g.stride(1), S,
        BS=bs, REP=rep, BLOCK_R=max(16, triton.next_power_of_2(rep)), HD=hd, BLOCK_T=BLOCK_T,
        HAS_GATE=gate is not None, IEEE=q.dtype == torch.float32 or INTERPRET,
        UPCAST=INTERPRET, SPLIT=S > 1, SPLIT_TOKENS=split_tokens, MAX_S=MAX_SPLITS,
    )  # fmt: skip
    if S > 1:
        _combine_kernel[(N, nh)](
            part, o, g, context_lens, o.stride(0), o.stride(1), g.stride(0), g.stride(1), nh, S,
            HD=hd, HAS_GATE=gate is not None, SPLIT_TOKENS=split_tokens,
            MAX_S=MAX_SPLITS, BLOCK_T=BLOCK_T,
        )  # fmt: skip
    return o


@triton.jit(do_not_specialize=["start_pos", "Tq"])
def _prefill_kernel(
    Q, K, V, O, block_table, start_pos, Tq, scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    BS: tl.constexpr, REP: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    mt = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // REP
    i = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    t = tl.arange(0, BLOCK_T)
    imask = i < Tq
    qpos = start_pos + i  # absolute positions of the queries
    q = tl.load(Q + i[:, None] * stride_qt + h * stride_qh + d[None, :], mask=imask[:, None],
                other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    end = tl.minimum(start_pos + (mt + 1) * BLOCK_M, start_pos + Tq)  # keys this tile sees
    for t0 in range(0, end, BLOCK_T):
        pos = t0 + t
        tmask = pos < end
        ok = tmask[None, :] & (pos[None, :] <= qpos[:, None])  # causal
        m_i, l_i, acc = _attend_tile(
            q, K, V, block_table, pos, tmask, ok, kvh, scale, m_i, l_i, acc,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            BS, HD, IEEE, UPCAST,
        )  # fmt: skip
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(O + i[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=imask[:, None])  # fmt: skip


def prefill_warps(block_m: int, kv_dtype: torch.dtype) -> int:
    """Warps of a prefill program: 4, but 8 for 16-query tiles over fp8 caches, whose widening
    spilled registers at 4 (sm_90, Triton 3.6, head dim 256: tests/test_triton_compile.py)."""
    return 8 if block_m == 16 and kv_dtype.itemsize == 1 else 4


@launcher("triton_attention")
def paged_prefill_attention(
    q: torch.Tensor,  # [Tq, nh, hd] queries at positions start_pos .. start_pos + Tq - 1
    key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd], the new K/V already written
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32, this sequence's row
    start_pos: int,
    scale: float,
) -> torch.Tensor:
    """Returns [Tq, nh, hd] in q's dtype."""
    Tq, nh, hd = q.shape
    bs, nkv = key_cache.shape[1], key_cache.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = torch.empty(Tq, nh, hd, dtype=q.dtype, device=q.device)
    block_m = 16 if Tq <= 16 else 32
    _prefill_kernel[(triton.cdiv(Tq, block_m), nh)](
        q, key_cache, value_cache, o, block_table, start_pos, Tq, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        o.stride(0), o.stride(1),
        BS=bs, REP=nh // nkv, HD=hd, BLOCK_M=block_m, BLOCK_T=BLOCK_T,
        IEEE=q.dtype == torch.float32 or INTERPRET, UPCAST=INTERPRET,
        num_warps=prefill_warps(block_m, key_cache.dtype),
    )  # fmt: skip
    return o
