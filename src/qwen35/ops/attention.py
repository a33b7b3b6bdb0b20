"""Paged causal attention over a block cache: the portable PyTorch path (SDPA on gathered K/V)
and the dispatch to the kernels that read K/V in place: Triton on the GPU
(kernels/triton_attention.py), C++ for decode on the CPU (kernels/attention.py).

Dispatch (backend chosen once, ops/backend.py):
- `paged_decode_attention(backend, q, k_cache, v_cache, decode, scale, gate)`: all decode rows;
- `attention_decode_gated(...)`: a pure decode step on a CPU with the kernels, from the q/k/v
  projections to the gated output in one call (norms, rotary and the cache write fused);
- `cached_prefill_attention(backend, q, k_cache, v_cache, block_row, start_pos, scale)`: one
  prefill chunk continuing a cached prefix (GPU path: the paged Triton kernel or the context
  gathered for FlashAttention, whichever engine/preflight.py timed faster at start).

Cache layout (forward_batch.py): K and V of one layer are [num_blocks, block_size, nkv, hd]
(the model dtype, bf16 / fp16 under an fp32 model on a CPU, or fp8 e4m3 under any: read widened);
token t lives at flat slot `block * block_size + offset`. A sequence's blocks are listed in its
row of `block_tables`. Query head h uses KV head h // (nh / nkv) (GQA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qwen35.ops.backend import Backend


def naive_attention(
    q: torch.Tensor,  # [Tq, nh, hd]
    k: torch.Tensor,  # [Tk, nkv, hd]
    v: torch.Tensor,  # [Tk, nkv, hd]
    scale: float,
) -> torch.Tensor:
    """Reference: query j sits at position Tk - Tq + j and sees keys 0..that position.
    Softmax in fp32, probabilities cast to the input dtype (transformers' eager)."""
    Tq, nh, _ = q.shape
    Tk, nkv, _ = k.shape
    rep = nh // nkv
    kk = k.repeat_interleave(rep, dim=1).transpose(0, 1)  # [nh, Tk, hd]
    vv = v.repeat_interleave(rep, dim=1).transpose(0, 1)
    s = (q.transpose(0, 1) @ kk.transpose(1, 2)) * scale  # [nh, Tq, Tk]
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(Tk, device=q.device)[None, :] > qpos, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return (p @ vv).transpose(0, 1)  # [Tq, nh, hd]


def write_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd]
    value_cache: torch.Tensor,
    k: torch.Tensor,  # [T, nkv, hd]
    v: torch.Tensor,  # [T, nkv, hd]
    slot_mapping: torch.Tensor,  # [T] int64 flat slots
) -> None:
    nkv, hd = k.shape[1:]
    for cache, x in ((key_cache, k), (value_cache, v)):
        x = x.to(cache.dtype)  # (to fp8: round to nearest even, saturating at +-448)
        if cache.dtype.itemsize == 1:  # index_copy_ takes no fp8 on a CPU: as bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, nkv, hd).index_copy_(0, slot_mapping, x)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd]
    block_table: torch.Tensor,  # [max_blocks] int, one sequence's row
    context_len: int,
) -> torch.Tensor:
    """One sequence's first `context_len` cached tokens: [context_len, nkv, hd]."""
    bs = cache.shape[1]
    nb = math.ceil(context_len / bs)
    return _gather_blocks(cache, block_table[:nb]).flatten(0, 1)[:context_len]


def _gather_blocks(cache: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """cache[idx] for block ids idx [...]: [..., block_size, nkv, hd]. index_select over whole
    blocks as rows is faster on a CPU than advanced indexing (which goes element-wise). fp8
    caches are selected as bytes (index_select does not take fp8 on every device)."""
    rows = cache.view(torch.uint8) if cache.dtype.itemsize == 1 else cache
    rows = rows.view(cache.shape[0], -1).index_select(0, idx.reshape(-1).long())
    return rows.view(cache.dtype).view(*idx.shape, *cache.shape[1:])


def prefill_attention(
    q: torch.Tensor,  # [Tq, nh, hd] new queries of one sequence
    k: torch.Tensor,  # [Tk, nkv, hd] the whole context (cached + new), Tk >= Tq
    v: torch.Tensor,  # [Tk, nkv, hd]
    scale: float,
    lower_right: bool = False,
) -> torch.Tensor:
    """Causal attention with the queries at the end of the context. Returns [Tq, nh, hd].
    lower_right: a chunk after cached tokens takes torch's bottom-right causal bias, which
    FlashAttention runs on a GPU (a boolean mask rules it out), instead of a boolean mask."""
    Tq, Tk = q.shape[0], k.shape[0]
    # 4-D [1, heads, T, hd]: with 3-D inputs the CPU SDPA falls back to its slow math path
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif lower_right:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(Tq, Tk)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale, enable_gqa=gqa)
    else:
        # SDPA's is_causal aligns top-left; with cached tokens the queries sit bottom-right.
        qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        mask = torch.arange(Tk, device=q.device)[None, :] <= qpos  # [Tq, Tk] True = attend
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor,  # [N, nh, hd] one query per sequence
    key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [N, >= max_blocks] int
    context_lens: torch.Tensor,  # [N] int64, tokens to attend (including the new one)
    max_context: int,
    scale: float,
    exact: bool = True,  # max_context is the largest context_lens (not a bound on it)
) -> torch.Tensor:
    """Batched single-token attention: gathers each sequence's blocks into a padded
    [N, nkv, L, hd] and masks past its length. Returns [N, nh, hd]."""
    N, nh, hd = q.shape
    bs, nkv = key_cache.shape[1], key_cache.shape[2]
    nb = math.ceil(max_context / bs)
    idx = block_tables[:, :nb]  # [N, nb]
    k = _gather_blocks(key_cache, idx).view(N, nb * bs, nkv, hd).transpose(1, 2).to(q.dtype)
    v = _gather_blocks(value_cache, idx).view(N, nb * bs, nkv, hd).transpose(1, 2).to(q.dtype)
    # One query token: the nh/nkv query heads of a KV head act as that many query rows against
    # it, so GQA needs neither expanded K/V nor a causal mask.
    qh = q.view(N, nkv, nh // nkv, hd)  # [N, nkv, rep, hd]
    if N == 1 and exact:  # one sequence: slice instead of masking
        k, v = k[:, :, :max_context], v[:, :, :max_context]
        o = F.scaled_dot_product_attention(qh, k, v, scale=scale)
    else:
        pos = torch.arange(nb * bs, device=q.device)
        mask = (pos[None, :] < context_lens[:, None])[:, None, None, :]  # [N, 1, 1, L]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    return o.reshape(N, nh, hd)


def _triton_ok(be: Backend, q: torch.Tensor) -> bool:
    hd = q.shape[-1]
    return be.triton_attention and be.on_gpu_path(q) and hd >= 16 and hd & (hd - 1) == 0


def paged_decode_attention(
    be: Backend,
    q: torch.Tensor,  # [N, nh, hd]
    key_cache: torch.Tensor,  # [num_blocks, block_size, nkv, hd]
    value_cache: torch.Tensor,
    d,  # DecodeBatch: block_tables [N, W], context_lens [N], max_context
    scale: float,
    gate: torch.Tensor | None = None,  # [N, nh, hd]: returns o * sigmoid(gate) when given
) -> torch.Tensor:
    """[N, nh, hd] in q's dtype."""
    if _triton_ok(be, q):
        from qwen35.kernels.triton_attention import paged_decode_attention as kernel

        return kernel(q, key_cache, value_cache, d.block_tables, d.context_lens, scale, gate,
                      max_context=d.max_context)  # split-K at long contexts
    if be.cpu_attention is not None and q.is_cpu:
        from qwen35.kernels import attention

        mod = attention.load()  # None once QWEN35_NO_KERNELS=1 is set, at any time
        if mod is not None and attention.takes(q.dtype, key_cache.dtype):
            return mod.paged_decode_attention(
                q.contiguous(), key_cache, value_cache, d.block_tables, d.context_lens, scale, gate
            )
    o = decode_attention(
        q, key_cache, value_cache, d.block_tables, d.context_lens, d.max_context, scale,
        exact=d.max_context_exact,
    ).to(q.dtype)
    return o if gate is None else o.mul_(torch.sigmoid(gate))


def attention_decode_gated(be: Backend, qg, k, v, q_norm, k_norm, cos, sin, key_cache,
                           value_cache, slot_mapping, d, scale: float):  # fmt: skip
    """A pure decode step on a CPU with the compiled kernels: the gated attention layer between
    its projections (qg [N, nh * 2 hd] per head [query | gate], k, v [N, nkv * hd]; q_norm and
    k_norm the RMSNorm modules) in one call, bitwise the op-by-op path; the new K/V are written
    to their slots. o [N, nh * hd] in the model dtype, or None where it does not apply (the
    caller runs the op-by-op path): no kernels, dtypes the kernel does not take.
    On the GPU path (Triton attention and pointwise kernels, every row a decode row): two
    launches, `_decode_triton`."""
    dt = key_cache.dtype
    if (
        be.triton_pointwise
        and _triton_ok(be, key_cache)  # (its last dim is head_dim)
        and d.all_rows
        and qg.dtype == dt == value_cache.dtype == cos.dtype == q_norm.weight.dtype
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
        and qg.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    ):
        return _decode_triton(be, qg, k, v, q_norm, k_norm, cos, sin, key_cache, value_cache,
                              slot_mapping, d, scale)  # fmt: skip
    if (
        be.cpu_attention is None
        or not qg.is_cpu
        or not (qg.dtype == cos.dtype == q_norm.weight.dtype and dt == value_cache.dtype)
    ):
        return None
    from qwen35.kernels import attention

    mod = attention.load()  # None once QWEN35_NO_KERNELS=1 is set, at any time
    if mod is None or not attention.takes(qg.dtype, dt):
        return None
    return mod.attention_decode_gated(
        qg, k, v, q_norm.weight, k_norm.weight, q_norm.eps, cos.contiguous(), sin.contiguous(),
        key_cache, value_cache, slot_mapping, d.block_tables, d.context_lens, scale,
    )  # fmt: skip


def _decode_triton(be, qg, k, v, q_norm, k_norm, cos, sin, key_cache, value_cache,
                   slot_mapping, d, scale):  # fmt: skip
    """Norms, rotary and the cache write in one kernel, then the paged decode attention with
    the output gate read in place from qg: o [N, nh * hd]."""
    from qwen35.kernels.triton_pointwise import qk_norm_rotary_cache

    hd = key_cache.shape[3]
    q = qk_norm_rotary_cache(qg, k, v, q_norm.weight, k_norm.weight, q_norm.eps,
                             cos.contiguous(), sin.contiguous(), key_cache, value_cache,
                             slot_mapping)  # fmt: skip
    N, nh = q.shape[:2]
    gate = qg.unflatten(-1, (nh, 2 * hd))[..., hd:]  # [N, nh, hd], strided
    return paged_decode_attention(be, q, key_cache, value_cache, d, scale, gate).view(N, nh * hd)


def cpu_prefill_kernel(be: Backend, q: torch.Tensor, key_cache: torch.Tensor):
    """The CPU prefill attention kernel's module where it runs these queries over this cache
    (kernels/attention.py: bf16 models on AVX512-BF16 CPUs, fp32 ones), else None. It takes
    every chunk of a prompt, the first too, from the cache: the same bits however the prompt was
    cut."""
    if be.cpu_prefill_attention is None or not q.is_cpu:
        return None
    from qwen35.kernels import attention

    mod = attention.load_prefill()  # None once QWEN35_NO_KERNELS=1 is set, at any time
    return mod if mod is not None and attention.prefill_takes(mod, q, key_cache) else None


def cached_prefill_attention(
    be: Backend,
    q: torch.Tensor,  # [Tq, nh, hd] at positions start_pos ..
    key_cache: torch.Tensor,  # the chunk's K/V already written
    value_cache: torch.Tensor,
    block_row: torch.Tensor,  # [max_blocks] this sequence's block table row
    start_pos: int,
    scale: float,
) -> torch.Tensor:
    """[Tq, nh, hd]: a prefill chunk over its cached prefix and itself (start_pos 0: the
    CPU kernel's first chunk, `cpu_prefill_kernel`)."""
    if (mod := cpu_prefill_kernel(be, q, key_cache)) is not None:
        return mod.prefill_attention(q.contiguous(), key_cache, value_cache,
                                     block_row.to(torch.int32).contiguous(), start_pos, scale)  # fmt: skip
    ctx = start_pos + q.shape[0]
    path = chunk_attention_path(be, q, ctx)
    if path == "triton":
        from qwen35.kernels.triton_attention import paged_prefill_attention as kernel

        return kernel(q, key_cache, value_cache, block_row, start_pos, scale)
    kk = gather_kv(key_cache, block_row, ctx).to(q.dtype)  # [ctx, nkv, hd]
    vv = gather_kv(value_cache, block_row, ctx).to(q.dtype)
    return prefill_attention(q, kk, vv, scale, lower_right=path == "sdpa")


# The GPU path's SDPA chunks gather their context: up to this many tokens (the working memory
# counts the gathered K/V of this many, engine/preflight.py), longer contexts take the paged kernel.
SDPA_MAX_CONTEXT = 65536


def chunk_attention_path(be: Backend, q: torch.Tensor, ctx: int) -> str:
    """How a prefill chunk of context `ctx` attends: "triton" (the paged kernel), "sdpa" (gather +
    SDPA with a bottom-right causal bias: FlashAttention on a GPU; the backend's
    `chunk_attention`, at most SDPA_MAX_CONTEXT tokens) or "reference" (gather + SDPA with a
    boolean mask: the PyTorch path)."""
    if not _triton_ok(be, q):
        return "reference"
    return "sdpa" if be.chunk_attention == "sdpa" and ctx <= SDPA_MAX_CONTEXT else "triton"


def sdpa_gather_bytes(cfg, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> int:
    """The K and V one SDPA chunk gathers at most (SDPA_MAX_CONTEXT tokens of one layer), in
    the model dtype, and first in the caches' where that differs (fp8: gathered, then widened)."""
    per = dtype.itemsize + (kv_dtype.itemsize if kv_dtype not in (None, dtype) else 0)
    return 2 * SDPA_MAX_CONTEXT * cfg.num_key_value_heads * cfg.head_dim * per
