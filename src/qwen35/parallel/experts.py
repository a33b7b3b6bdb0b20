"""Expert parallelism: each rank of the tensor-parallel group holds num_experts / tp routed
experts whole. Activations are replicated over the group (tensor parallelism), so dispatch needs
no communication: every rank runs the (token, choice) pairs routed to its own experts, and the
MoE block's one all-reduce (which also sums the tensor-parallel shared expert) combines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.layers.moe import Experts


class LocalExperts(Experts):
    """Expert parallelism: this rank holds experts [first, first + num_experts) whole, and runs
    only the pairs routed to them; the rest of each token's output comes from other ranks."""

    def __init__(self, num_total: int, hidden: int, intermediate: int, dtype, device, tp):
        super().__init__(tp.part(num_total), hidden, intermediate, dtype, device)
        self.first_expert = tp.start(num_total)

    def forward(self, x, top_idx, top_w, backend=None) -> torch.Tensor:  # [T, H], [T, k], [T, k] -> [T, H]
        k = top_idx.shape[1]
        flat = top_idx.reshape(-1) - self.first_expert  # [T*k] local expert ids
        mine = ((flat >= 0) & (flat < self.num_experts)).nonzero().squeeze(1)  # [P] pair ids
        local = flat.index_select(0, mine)
        order = torch.argsort(local, stable=True)
        pairs = mine.index_select(0, order)  # [P] pairs grouped by expert
        counts = torch.bincount(local, minlength=self.num_experts).tolist()
        token_of = pairs // k
        xs = x.index_select(0, token_of)  # [P, H]
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[start : start + n]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            ys[start : start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])  # [n, H]
            start += n
        ys.mul_(top_w.reshape(-1, 1).index_select(0, pairs))
        return torch.zeros_like(x).index_add_(0, token_of, ys)
