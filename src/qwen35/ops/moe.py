"""Routed experts of the sparse MoE block: SwiGLU per (token, choice) pair, weighted, summed.

Both paths sort the (token, choice) pairs by expert so each expert's rows are contiguous:
- `grouped_experts_reference`: one gate_up and one down matmul per active expert (a Python loop
  over the experts, reading the counts on the host; `mm` does the matmuls: F.linear, or on a CPU
  layers/linear.py's `linear`, which takes the GEMV kernels for few rows);
- the grouped path: two `torch._grouped_mm` calls over all experts at once, group offsets
  computed on the device (no host sync, no Python loop: capturable in a CUDA graph).
`routed_experts(backend, ...)` picks: the grouped path on a GPU (where `backend.grouped_mm`, probed
once in ops/backend.py, says it runs), the loop with the GEMV kernels on a CPU.

Shapes: x [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I]; top_idx, top_w [T, k].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.backend import Backend
from qwen35.ops.pointwise import silu_mul


def _sort_pairs(top_idx: torch.Tensor):
    flat = top_idx.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    return flat, order, order // top_idx.shape[1]  # token of each sorted pair


def grouped_experts_reference(x, gate_up, down, top_idx, top_w, mm=F.linear) -> torch.Tensor:
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
    flat, order, token_of = _sort_pairs(top_idx)
    E = gate_up.shape[0]
    # counts by scatter_add (bincount sizes its output from the max: a host sync on CUDA)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    xs = x.index_select(0, token_of)  # [T*k, H]
    gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)  # [T*k, 2I]
    gate, up = gu.chunk(2, dim=-1)
    h = silu_mul(be, gate, up, inplace=True)  # [T*k, I]
    ys = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)  # [T*k, H]
    ys.mul_(top_w.reshape(-1, 1).index_select(0, order))
    return torch.zeros_like(x).index_add_(0, token_of, ys)


# On a GPU the grouped GEMM is always taken: one launch, and no host sync. On a CPU the loop over
# the active experts wins once its matmuls are `layers/linear.py`'s (the GEMV kernels up to 8 bf16
# / 16 fp32 rows, each expert's weight streamed once): bf16, 2 threads, Zen 5 VM, experts cycled
# through DRAM, ms a layer, loop / grouped GEMM: 35B-A3B shapes (256 experts, H 2048, I 512,
# top-8) 1.28 / 2.38 at 1 token, 7.2 / 8.4 at 4, 23.6 / 27.3 at 16; 64 experts, H 1024, I 256:
# 0.47 / 0.85 at 1, 3.2 / 5.5 at 16 (an A/B script, not in the repo). With F.linear, whose one-row
# bf16 GEMM is slow, the loop had lost at decode sizes (38 vs 1.8 ms at 1 token on the small shape):
# so without the kernels, decode-sized inputs keep the grouped GEMM.
CPU_GMM_MAX_ROWS = 16


def routed_experts(be: Backend, x, gate_up, down, top_idx, top_w) -> torch.Tensor:
    if be.device_type != "cpu" or be.on_gpu_path(x):  # (tests run CUDA backends on CPU tensors)
        if be.grouped_mm and x.dtype == gate_up.dtype:
            return grouped_experts_gmm(x, gate_up, down, top_idx, top_w, be)
        return grouped_experts_reference(x, gate_up, down, top_idx, top_w)
    from qwen35.kernels import gemv

    if gemv.load() is not None:  # the CPU GEMV kernels, which layers/linear.py takes for few rows
        from qwen35.layers.linear import linear

        return grouped_experts_reference(x, gate_up, down, top_idx, top_w, mm=linear)
    # no kernels (no compiler, not x86, QWEN35_NO_KERNELS=1): the grouped GEMM for few rows
    if be.grouped_mm and x.dtype == gate_up.dtype and x.shape[0] <= CPU_GMM_MAX_ROWS:
        return grouped_experts_gmm(x, gate_up, down, top_idx, top_w, be)
    return grouped_experts_reference(x, gate_up, down, top_idx, top_w)
