"""Expert parallelism: each rank of the tensor-parallel group holds num_experts / tp routed
experts whole. Activations are replicated over the group (tensor parallelism), so dispatch needs
no communication: every rank runs the (token, choice) pairs routed to its own experts
(`Experts.forward` skips the others), and the MoE block's one all-reduce (which also sums the
tensor-parallel shared expert) combines them.
"""

from __future__ import annotations

from qwen35.layers.moe import Experts
from qwen35.parallel.context import TensorParallel


def place(experts: Experts, tp: TensorParallel, num_total: int) -> Experts:
    """Mark `experts` (num_total / tp of them) as this rank's: [rank * n, (rank + 1) * n)."""
    experts.first_expert, experts.num_total = tp.start(num_total), num_total
    return experts


def same_place(new: Experts, old: Experts) -> Experts:
    """A replacement (quantized) module for `old` holds the same experts."""
    if old.num_total is not None:
        new.first_expert, new.num_total = old.first_expert, old.num_total
    return new
