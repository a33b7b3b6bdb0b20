"""Routed experts of the sparse MoE block: SwiGLU per (token, choice) pair, weighted, summed.

Both paths sort the (token, choice) pairs by expert so each expert's rows are contiguous:
- `grouped_experts_reference`: one gate_up and one down matmul per active expert (a Python loop
  over the experts, reading the counts on the host; `mm` does the matmuls: F.linear, or on a CPU
  layers/linear.py's `linear`, which takes the GEMV kernels for few rows);
- the grouped path: two `torch._grouped_mm` calls over all experts at once, group offsets
  computed on the device (no host sync, no Python loop: capturable in a CUDA graph).
`routed_experts(backend, ...)` picks: the grouped path on a GPU (where `backend.grouped_mm`, probed
once in ops/backend.py, says it runs), the loop with the GEMV kernels on a CPU.
`fused_moe(backend, ...)`: the whole block (routing, routed and shared experts) for a few tokens
on the GPU in three Triton launches (kernels/triton_moe.py), or None where it does not apply;
`cpu_moe_step(...)`: the same block for a few bf16 rows on a CPU in one call (gemv_cpu.cpp
`moe_bf16`), resolved once for its weights; `few_token_moe(...)`: the routed experts of a few CPU
rows of any other expert format between a C++ routing call and a C++ weighted sum.

Shapes: x [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I]; top_idx, top_w [T, k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen35.ops.backend import Backend
from qwen35.ops.pointwise import silu_mul


def _sort_pairs(top_idx: torch.Tensor):
    flat = top_idx.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    return flat, order, order // top_idx.shape[1]  # token of each sorted pair


def _expert_counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert [E] int32, by scatter_add (bincount sizes its output from the max: a
    host sync on CUDA)."""
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def _stacked(many, which: str, fn, parts, experts) -> torch.Tensor:
    """Every active expert's `which` product of its rows, stacked: one many(which, parts,
    experts) call where it takes them, else fn(rows, e) an expert."""
    ys = many and many(which, parts, experts)
    if ys is None:
        ys = torch.cat([fn(v, e) for v, e in zip(parts, experts, strict=True)])
    return ys


def few_token_experts(x, top_idx, top_w, gate_up_fn, down_fn, many=None) -> torch.Tensor:
    """The routed experts of at most FEW_TOKENS tokens (CPU decode steps): the general loop
    below on the same sorted pairs, weighted by its one mul_ and summed by its one index_add_ in
    its order, so the result is the loop's bit for bit (and batched == alone as the loop), with
    its per-expert ops batched: every active expert's gate_up product (its 1..FEW_TOKENS rows)
    stacked in one [pairs, 2I] output by one `many` call (where it takes them all), the SwiGLU in
    three ops over all of them, the down products by another call. gate_up_fn(x [n, H], e) ->
    [n, 2I]; down_fn(h [n, I], e) -> [n, H]; many(which, inputs, experts): every expert's
    gate_up ("gate_up") or down ("down") product of its inputs, stacked [sum rows, N], by one
    call, or None (one call each then; bf16: layers/linear.py `linear_many`; quantized experts:
    quant/layers.py IntExperts.many, Fp8Experts.many)."""
    flat, order, token_of = _sort_pairs(top_idx)
    ids = flat.index_select(0, order).tolist()  # the step's one host read, as the loop's bincount
    es, ns = [], []  # the active experts, ascending, and the pairs of each
    for e in ids:
        if es and es[-1] == e:
            ns[-1] += 1
        else:
            es.append(e)
            ns.append(1)
    xs = x.index_select(0, token_of).split(ns)  # each expert's input rows
    gate, up = _stacked(many, "gate_up", gate_up_fn, xs, es).chunk(2, dim=-1)  # [P, I] each
    hs = (F.silu(gate) * up).split(ns)
    ys = _stacked(many, "down", down_fn, hs, es)
    ys.mul_(top_w.reshape(-1, 1).index_select(0, order))  # [P, H]
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def few_token_moe(x, router_w, top_k: int, gate_up_fn, down_fn, many=None):
    """The routed experts of 1..FEW_TOKENS rows on a CPU from their router logits on: one
    gemv_cpu.cpp `moe_route` call (logits, softmax, top-k with ties to the lower expert id,
    renormalised weights, the pairs sorted by expert and their rows gathered), the experts'
    products as in few_token_experts (`many`, or one call an expert), the SwiGLU of all of them
    in one small-op call, and one `moe_combine` call (each token's weighted pairs summed in fp32,
    rounded once): ~6 calls where routing and few_token_experts make ~30 (README: Model
    implementation). The experts of every format take it (int8 / int4 / FP8 / fp32; bf16 blocks
    take `cpu_moe_step`'s single call). None where it does not apply: no CPU kernels, a router of
    another dtype than x's (but a bf16 one under fp32 rows, `--quantization bf16`: its logits
    are then linear_bf16's fp32 rows, as layers/linear.py `linear` computes them), rows that are
    not 1..FEW_TOKENS bf16 / fp32 rows."""
    from qwen35.kernels import gemv

    mod = gemv.load()
    router_ok = router_w.dtype in (x.dtype, torch.bfloat16)  # (bf16-stored under fp32 rows)
    if (mod is None or not router_ok or x.dtype not in (torch.float32, torch.bfloat16)
            or not takes_few_tokens(x) or not router_w.is_contiguous()):  # fmt: skip
        return None
    xs, es, ns, w, token = mod.moe_route(x.contiguous(), router_w, top_k)
    parts = xs.split_with_sizes(ns)  # (without Tensor.split's Python wrapper)
    gu = _stacked(many, "gate_up", gate_up_fn, parts, es)
    hs = _silu_mul(*gu.chunk(2, dim=-1)).split_with_sizes(ns)  # [P, I] by expert
    ys = _stacked(many, "down", down_fn, hs, es)
    return mod.moe_combine(ys.contiguous(), w, token, x.shape[0])


def _silu_mul(gate, up):
    from qwen35.kernels import small_ops

    so = small_ops.load()
    return F.silu(gate) * up if so is None else so.silu_mul(gate, up)


# Up to this many tokens a CPU step takes few_token_experts (an expert then has at most this many
# rows: the int4 many-kernel takes up to 16 a product, the bf16 / int8 / FP8 ones layers/linear.py
# MANY_MAX_ROWS, above which their `many` says None and each expert runs its own call, as in the
# loop); 0: never (tests compare it with the loop below).
FEW_TOKENS = 16


def takes_few_tokens(x: torch.Tensor) -> bool:
    """Whether the routed experts of x [T, H] run few_token_experts (a CPU step of few tokens)."""
    return x.shape[0] <= FEW_TOKENS and x.device.type == "cpu"


def grouped_experts_reference(x, gate_up, down, top_idx, top_w, mm=F.linear,
                              many=None) -> torch.Tensor:  # fmt: skip
    """many: see few_token_experts (a few tokens on a CPU only)."""
    if takes_few_tokens(x):
        return few_token_experts(x, top_idx, top_w, lambda v, e: mm(v, gate_up[e]),
                                 lambda h, e: mm(h, down[e]), many)  # fmt: skip
    flat, order, token_of = _sort_pairs(top_idx)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x.index_select(0, token_of)  # [T*k, H]
    ys = torch.empty_like(xs)  # [T*k, H]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        seg = xs[start : start + n]  # [n, H]
        gate, up = mm(seg, gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        ys[start : start + n] = mm(F.silu(gate) * up, down[e])  # [n, H]
        start += n
    ys.mul_(top_w.reshape(-1, 1).index_select(0, order))  # weight each pair
    return torch.zeros_like(x).index_add_(0, token_of, ys)  # [T, H]


def grouped_experts_gmm(x, gate_up, down, top_idx, top_w, be: Backend | None = None):
    """gate_up, down: [E, N, K] weights in x's dtype. Deterministic (no atomics)."""
    flat, order, token_of = _sort_pairs(top_idx)
    offs = _expert_counts(flat, gate_up.shape[0]).cumsum(0, dtype=torch.int32)  # groups' ends
    xs = x.index_select(0, token_of)  # [T*k, H]
    gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)  # [T*k, 2I]
    gate, up = gu.chunk(2, dim=-1)
    h = silu_mul(be, gate, up, inplace=True)  # [T*k, I]
    ys = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)  # [T*k, H], sorted
    # back to (token, choice) order, then each token's k weighted in choice order: index_add_
    # adds with atomics on a GPU (the order, and so the last bits, varying from run to run)
    T, k = top_idx.shape
    ys = torch.empty_like(ys).index_copy_(0, order, ys).view(T, k, -1)
    return (ys * top_w[..., None]).sum(1)


def tiled_experts(x, top_idx, top_w, num_experts: int, gemm, be: Backend | None = None):
    """The routed experts of a step by a grouped GEMM over tiles of rows sorted by expert
    (quantized experts on a GPU: quant/int_gpu.py, quant/fp8_gpu.py): the (token, choice) pairs
    sorted by expert, each expert's rows cut into tiles on the device (kernels/triton_tiles.py),
    gate_up reading each pair's token row in place, down writing each pair's row back in its
    own order, so each token's k are weighted and summed in choice order (no atomics:
    deterministic; a token's rows give the same bits wherever the step holds them). No host
    sync (capturable). gemm(which, inp, rows, tiles, bm, xidx, yidx): "gate_up" / "down"
    products [rows, N] (row i reads inp[xidx[i]] and is written to y[yidx[i]], each where
    given), or None (no kernel: so is the result)."""
    from qwen35.kernels.triton_tiles import gemm_bm, tile_rows

    T, k = top_idx.shape
    flat, order, token_of = _sort_pairs(top_idx)
    bm = gemm_bm(T * k / num_experts)
    tiles = tile_rows(_expert_counts(flat, num_experts), bm, T * k)
    gu = gemm("gate_up", x.contiguous(), T * k, tiles, bm, token_of, None)
    if gu is None:
        return None
    gate, up = gu.chunk(2, dim=-1)
    h = silu_mul(be, gate, up).contiguous()  # [T k, I], sorted by expert
    ys = gemm("down", h, T * k, tiles, bm, None, order)  # [T k, H], (token, choice) order
    return None if ys is None else (ys.view(T, k, -1) * top_w[..., None]).sum(1)


# On a GPU the grouped GEMM is always taken: one launch, and no host sync. On a CPU the loop over
# the active experts wins once its matmuls are `layers/linear.py`'s (the GEMV kernels up to 8 bf16
# / 16 fp32 rows, each expert's weight streamed once): bf16, 2 threads, Zen 5 VM, experts cycled
# through DRAM, ms a layer, loop / grouped GEMM: 35B-A3B shapes (256 experts, H 2048, I 512,
# top-8) 1.28 / 2.38 at 1 token, 7.2 / 8.4 at 4, 23.6 / 27.3 at 16; 64 experts, H 1024, I 256:
# 0.47 / 0.85 at 1, 3.2 / 5.5 at 16 (an A/B script, not in the repo). With F.linear, whose one-row
# bf16 GEMM is slow, the loop had lost at decode sizes (38 vs 1.8 ms at 1 token on the small shape):
# so without the kernels, decode-sized inputs keep the grouped GEMM.
CPU_GMM_MAX_ROWS = 16


def plain_many(gate_up, down):
    """many(which, xs, experts) for plain experts [E, N, K]: a few tokens' products in one
    layers/linear.py `linear_many` call (bf16 weights), or None."""
    from qwen35.layers.linear import linear_many

    return lambda which, xs, experts: linear_many(
        xs, [(gate_up if which == "gate_up" else down)[e] for e in experts])  # fmt: skip


def routed_experts(be: Backend, x, gate_up, down, top_idx, top_w) -> torch.Tensor:
    if be.device_type != "cpu" or be.on_gpu_path(x):  # (tests run CUDA backends on CPU tensors)
        if be.grouped_mm and x.dtype == gate_up.dtype:
            return grouped_experts_gmm(x, gate_up, down, top_idx, top_w, be)
        return grouped_experts_reference(x, gate_up, down, top_idx, top_w)
    from qwen35.kernels import gemv

    if gemv.load() is not None:  # the CPU GEMV kernels, which layers/linear.py takes for few rows
        from qwen35.layers.linear import linear

        return grouped_experts_reference(x, gate_up, down, top_idx, top_w, mm=linear,
                                         many=plain_many(gate_up, down))  # fmt: skip
    # no kernels (no compiler, not x86, QWEN35_NO_KERNELS=1): the grouped GEMM for few rows
    if be.grouped_mm and x.dtype == gate_up.dtype and x.shape[0] <= CPU_GMM_MAX_ROWS:
        return grouped_experts_gmm(x, gate_up, down, top_idx, top_w, be)
    return grouped_experts_reference(x, gate_up, down, top_idx, top_w)


FUSED_MAX_TOKENS = 16  # the Triton MoE's limit: above it the grouped GEMM (experts shared more)


@dataclass(frozen=True)
class ExpertWeights:
    """The routed experts as the kernels read them: plain (model dtype, scales None) or FP8
    e4m3 with fp32 scales per bo x bk block (the official layout's 128 x 128, or one row and 32 /
    64 / 128 inputs: a compressed-tensors FP8 checkpoint's scales per channel, a 4-bit one's
    groups held exactly; gate blocks, then up)."""

    gate_up: torch.Tensor  # [E, 2I, H], gate rows first
    down: torch.Tensor  # [E, H, I]
    gate_up_scale: torch.Tensor | None = None  # [E, 2 ceil(I/bo), ceil(H/bk)]
    down_scale: torch.Tensor | None = None  # [E, ceil(H/bo), ceil(I/bk)]
    block_o: int = 128  # FP8: weight rows a scale covers (bo: 128, or 1 for a scale a row)
    block_k: int = 128  # FP8: inputs a scale covers (128; 32 / 64 with bo = 1)


@dataclass(frozen=True)
class SharedExpert:
    """The shared expert of the block, its gate / up projections of x already computed."""

    gate_weight: torch.Tensor  # shared_expert_gate [1, H], model dtype
    gate: torch.Tensor  # [T, Is] gate_proj(x) (rows may be strided)
    up: torch.Tensor  # [T, Is] up_proj(x)
    down: torch.Tensor  # [H, Is], model dtype or e4m3
    down_scale: torch.Tensor | None = None  # [ceil(H/128), ceil(Is/128)] with an e4m3 down
    gate_logit: torch.Tensor | None = None  # [T] shared_expert_gate(x) (strided), if computed


def fused_moe(be: Backend, x, router_w, top_k: int, experts, shared,
              packed: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """The MoE block's output [T, H] from kernels/triton_moe.py (router logits by one matmul),
    or None where it does not apply: no Triton MoE, more than FUSED_MAX_TOKENS tokens, weights
    it does not read (quantized other than FP8 in ExpertWeights' blocks, another dtype). Under
    tensor parallelism each rank's output is its partial sum (experts split by intermediate
    size; the caller all-reduces).
    experts: ExpertWeights or None; shared: None or (shared_expert_gate weight [1, H],
    fn x -> (gate [T, Is], up [T, Is]), down weight [H, Is], its FP8 scales or None).
    packed: SparseMoE.packed_router (router, the shared expert's gate and up, shared_expert_gate in
    one weight, with shared) or None: their products then come from one matmul."""
    if experts is None or not (be.triton_moe and be.on_gpu_path(x)) or x.dim() != 2:
        return None
    if x.shape[0] > FUSED_MAX_TOKENS or not x.dtype.is_floating_point or x.dtype.itemsize < 2:
        return None
    pairs = [(router_w, None), (experts.gate_up, experts.gate_up_scale),
             (experts.down, experts.down_scale)]  # fmt: skip
    if shared is not None:
        pairs += [(shared[0], None), (shared[2], shared[3])]
        bo, bk = experts.block_o, experts.block_k
        if shared[3] is not None and shared[3].shape != (-(-shared[2].shape[0] // bo),
                                                         -(-shared[2].shape[1] // bk)):
            return None  # (the shared expert's blocks are the routed ones')
    for w, scale in pairs:  # plain weights in x's dtype, or e4m3 with fp32 block scales
        want = x.dtype if scale is None else torch.float8_e4m3fn
        if not isinstance(w, torch.Tensor) or w.dtype != want or not w.is_contiguous():
            return None
        if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
            return None
    from qwen35.kernels import triton_moe

    x = x.contiguous()
    if shared is None:
        return triton_moe.sparse_moe(x, F.linear(x, router_w), top_k, experts, None)
    gate_w, gate_up_fn, down_w, down_s = shared
    logit = None  # shared_expert_gate(x), where the packed matmul gives it
    if packed is not None and packed.dtype == x.dtype:  # router and shared inputs at once
        E, Is = router_w.shape[0], down_w.shape[1]
        out = F.linear(x, packed)  # [T, E + 2 Is + 1 + padding]
        logits, g, u = out[:, :E], out[:, E : E + Is], out[:, E + Is : E + 2 * Is]
        logit = out[:, E + 2 * Is]
    else:
        logits = F.linear(x, router_w)  # [T, E]
        g, u = gate_up_fn(x)
    parts = SharedExpert(gate_w, g, u, down_w, down_s, gate_logit=logit)
    return triton_moe.sparse_moe(x, logits, top_k, experts, parts)


def cpu_moe_step(router_w, top_k: int, experts, shared):
    """fn(x) -> the MoE block's output [T, H] by one gemv_cpu.cpp `moe_bf16` call (routing,
    the picked experts, the shared expert; three fork / joins in all), for rows `cpu_moe_takes`;
    or None where the call does not take these weights: no CPU kernels, anything but plain bf16
    weights (int8 / int4 / FP8 experts, fp32 models and bf16-stored experts under them: the loop
    above). The kernel's PyTorch twin is layers/moe.py's module with backend None: the same ops
    rounded where they round (ties in the top-k go to the lower expert id; each token's routed
    pairs summed in fp32, where the twin adds them in bf16). ~230 us of host work a layer at
    batch 1 (router, top-k, sort, splits, SwiGLU, weighting: ~25 ops) becomes one call (README:
    Model implementation). experts: ExpertWeights or None; shared: (shared_expert_gate weight
    [1, H], the shared expert's packed gate_up [2Is, H], its down [H, Is])."""
    from qwen35.kernels import gemv

    mod = gemv.load()
    if mod is None or experts is None or experts.gate_up_scale is not None:
        return None
    ws = (router_w, experts.gate_up, experts.down, *shared)
    if not all(isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.is_cpu
               and w.is_contiguous() for w in ws):  # fmt: skip
        return None
    gate_w, gate_up_w, down_w = shared
    return lambda x: mod.moe_bf16(x.contiguous(), router_w, experts.gate_up, experts.down, top_k,
                                  gate_w, gate_up_w, down_w)  # fmt: skip


def cpu_moe_takes(x: torch.Tensor) -> bool:
    """Rows `cpu_moe_step`'s call takes: 1 to FEW_TOKENS bf16 rows on a CPU."""
    return x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] >= 1 and takes_few_tokens(x)
