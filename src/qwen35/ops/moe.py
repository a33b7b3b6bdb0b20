"""Routed experts of the sparse MoE block: SwiGLU per (token, choice) pair, weighted, summed.

Both paths sort the (token, choice) pairs by expert so each expert's rows are contiguous:
- `grouped_experts_reference`: one gate_up and one down matmul per active expert (a Python loop
  over the experts, reading the counts on the host);
- the grouped path: two `torch._grouped_mm` calls over all experts at once, group offsets
  computed on the device (no host sync, no Python loop: capturable in a CUDA graph).
`routed_experts(backend, ...)` picks by `backend.grouped_mm` (probed once, ops/backend.py).

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


def grouped_experts_reference(x, gate_up, down, top_idx, top_w) -> torch.Tensor:
    flat, order, token_of = _sort_pairs(top_idx)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x.index_select(0, token_of)  # [T*k, H]
    ys = torch.empty_like(xs)  # [T*k, H]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        seg = xs[start : start + n]  # [n, H]
        gate, up = F.linear(seg, gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        ys[start : start + n] = F.linear(F.silu(gate) * up, down[e])  # [n, H]
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


# On a CPU the grouped GEMM wins for decode-sized inputs (one expert's rows are few; the loop's
# per-expert dispatch dominates) and loses for long prefills (measured 64 experts, H 1024,
# I 256, top-8, 2 threads: T=1 bf16 1.8 vs 38 ms, T=512 bf16 144 vs 81 ms; /tmp A/B script in
# the commit message). On a GPU it is always taken: one launch, and no host sync.
CPU_GMM_MAX_ROWS = 16


def routed_experts(be: Backend, x, gate_up, down, top_idx, top_w) -> torch.Tensor:
    use = be.grouped_mm and x.dtype == gate_up.dtype
    if use and (be.on_gpu_path(x) or x.shape[0] <= CPU_GMM_MAX_ROWS):
        return grouped_experts_gmm(x, gate_up, down, top_idx, top_w, be)
    return grouped_experts_reference(x, gate_up, down, top_idx, top_w)
