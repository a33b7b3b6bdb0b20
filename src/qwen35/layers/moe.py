"""Sparse MoE block of Qwen 3.5 (architecture doc section 1.4), computed grouped by expert.

Router: logits in the model dtype, softmax in fp32, top-k, always renormalised, weights cast to
the model dtype. Routed experts (ops/moe.py): the (token, choice) pairs are sorted by expert,
then either each active expert runs one gate_up and one down matmul on its contiguous group
(reference) or two grouped GEMMs cover all experts (backend.grouped_mm); the weighted results
are scattered back with one index_add_ (the grouped path: each token's k summed in choice order,
no atomics). A shared SwiGLU expert is added, scaled by
sigmoid(shared_expert_gate(x)).

Parameter names and shapes are transformers' (fused expert tensors, no `.weight` suffix):
`gate.weight` [E, H], `experts.gate_up_proj` [E, 2I, H] (gate rows first),
`experts.down_proj` [E, H, I], `shared_expert.{gate,up,down}_proj.weight`,
`shared_expert_gate.weight` [1, H].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.layers.linear import Linear, empty_param, gemm, linear, pack_linears, packed_linear
from qwen35.layers.lora import adapted
from qwen35.layers.mlp import MLP
from qwen35.ops import moe as _ops_moe
from qwen35.ops.backend import Backend
from qwen35.ops.moe import (
    FUSED_MAX_TOKENS,
    ExpertWeights,
    cpu_moe_step,
    cpu_moe_takes,
    few_token_experts,
    few_token_moe,
    fused_moe,
    grouped_experts_reference,
    plain_many,
    routed_experts,
)
from qwen35.parallel.context import SINGLE, TensorParallel


class Experts(nn.Module):
    # expert parallelism (parallel/experts.py): this module holds experts [first_expert,
    # first_expert + num_experts) of num_total; pairs routed to the others are other ranks'
    first_expert = 0
    num_total: int | None = None  # None: all of them

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype, device):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        E, H, I = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = empty_param(E, 2 * I, H, dtype=dtype, device=device)
        self.down_proj = empty_param(E, H, I, dtype=dtype, device=device)

    @property
    def grouped(self) -> bool:
        """All experts' plain weights here: the grouped path (no host sync, capturable)."""
        return type(self) is Experts and self.num_total is None

    def fused_weights(self):
        """The weights as kernels/triton_moe.py reads them, or None (quantized other than FP8,
        or only some experts here)."""
        if not self.grouped:
            return None
        return ExpertWeights(self.gate_up_proj, self.down_proj)

    def few_token_graphs(self, backend: Backend) -> int:
        """Tokens up to which a step runs these experts without a host sync (a decode graph can
        capture it; 0: none): ops/moe.py's FUSED_MAX_TOKENS where the Triton MoE reads their
        weights."""
        return FUSED_MAX_TOKENS if backend.triton_moe and self.fused_weights() is not None else 0

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:  # [n, H] -> [n, 2I]
        return gemm(x, self.gate_up_proj[e])

    def many(self, which: str, xs: list, experts: list) -> torch.Tensor | None:
        """The gate_up / down products of xs[i] by experts[i], stacked [sum rows, N], in one call
        where a kernel does that (quant/layers.py), else None: one call each."""
        return None

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:  # [n, I] -> [n, H]
        return gemm(h, self.down_proj[e])

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        top_idx: torch.Tensor,  # [T, k] expert ids
        top_w: torch.Tensor,  # [T, k] routing weights in x.dtype
        backend: Backend | None = None,
    ) -> torch.Tensor:
        if self.grouped:  # plain weights: grouped path
            if backend is None:
                return grouped_experts_reference(
                    x, self.gate_up_proj, self.down_proj, top_idx, top_w
                )
            return routed_experts(backend, x, self.gate_up_proj, self.down_proj, top_idx, top_w)
        # quantized experts (qwen35/quant) or some of them (expert parallelism): one gate_up and
        # one down per active expert
        if _ops_moe.takes_few_tokens(x) and self.num_total is None:
            return few_token_experts(x, top_idx, top_w, self.gate_up, self.down, self.many)
        k = top_idx.shape[1]
        local = top_idx.reshape(-1) - self.first_expert  # [T*k] ids among this module's
        if self.num_total is None:
            order = torch.argsort(local, stable=True)  # (token, choice) pairs by expert
        else:  # only the pairs routed to this module's experts
            mine = ((local >= 0) & (local < self.num_experts)).nonzero().squeeze(1)  # [P]
            local = local.index_select(0, mine)
            order = mine.index_select(0, torch.argsort(local, stable=True))
        counts = torch.bincount(local, minlength=self.num_experts).tolist()
        token_of = order // k  # [P] source token of each sorted pair
        xs = x.index_select(0, token_of)  # [P, H]
        ys = torch.empty_like(xs)  # [P, H]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[start : start + n]  # [n, H]
            gate, up = self.gate_up(seg, e).chunk(2, dim=-1)  # [n, I] each
            ys[start : start + n] = self.down(F.silu(gate) * up, e)  # [n, H]
            start += n
        ys.mul_(top_w.reshape(-1, 1).index_select(0, order))  # weight each pair
        out = torch.zeros_like(x)
        return out.index_add_(0, token_of, ys)  # [T, H]


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        moe_intermediate_size: int,
        shared_intermediate_size: int,
        dtype=None,
        device=None,
        tp: TensorParallel = SINGLE,
    ):
        """Tensor parallelism splits every expert's intermediate size; with expert parallelism
        each rank holds num_experts / tp whole experts instead. The shared expert is split
        either way; routed + shared partial outputs are summed over the ranks once."""
        super().__init__()
        self.top_k = top_k
        self.tp = tp
        self.gate = Linear(hidden_size, num_experts, dtype, device)  # router [E, H], replicated
        if tp.ep_size > 1:  # whole experts, num_experts / tp of them
            from qwen35.parallel.experts import place

            local = Experts(tp.part(num_experts), hidden_size, moe_intermediate_size, dtype, device)
            self.experts = place(local, tp, num_experts)
        else:  # every expert, split by intermediate size
            self.experts = Experts(
                num_experts, hidden_size, tp.part(moe_intermediate_size), dtype, device
            )
        self.shared_expert = MLP(
            hidden_size, shared_intermediate_size, dtype, device, tp, reduce=False
        )
        self.shared_expert_gate = Linear(hidden_size, 1, dtype, device)  # [1, H]
        self.packed_router: torch.Tensor | None = None  # + the shared expert's inputs, see pack()

    def pack_groups(self) -> list[tuple[tuple[Linear, ...], int]]:
        """The linears pack() packs (and rows_multiple): the loader allocates them as one."""
        sh = self.shared_expert
        return [((self.gate, sh.gate_proj, sh.up_proj, self.shared_expert_gate), 16)]

    def pack(self) -> None:
        """One [E + 2 Is + 1 (+ zero rows to a multiple of 16), H] weight for the four matrices
        that read the block's input (router, the shared expert's gate_proj and up_proj,
        shared_expert_gate), where all four are plain weights of one dtype: the GPU's decode
        step (ops/moe.py fused_moe) reads them in one matmul instead of two and the Triton down
        kernel takes the shared gate's logit from it. The shared expert's packed_gate_up
        becomes a view of its rows (the MLP's own pack() then leaves it)."""
        sh = self.shared_expert
        ((lins, rows),) = self.pack_groups()
        sh.packed_by_parent = False
        self.packed_router = None
        if all(type(lin) is Linear for lin in lins) and len({lin.weight.dtype for lin in lins}) == 1:
            self.packed_router = pack_linears(*lins, rows_multiple=rows)
            E, Is = self.gate.out_features, sh.gate_proj.out_features
            sh.packed_gate_up = self.packed_router[E : E + 2 * Is]
            sh.packed_by_parent = True

    def route(self, x: torch.Tensor, backend: Backend | None = None):
        """x: [T, H] -> (top_w [T, k] in x.dtype, top_idx [T, k]). With the Triton MoE (GPU)
        the softmax, top-k and renormalisation are one kernel (kernels/triton_moe.py `route`);
        this is its reference."""
        logits = self.gate(x)  # [T, E]
        if backend is not None and backend.triton_moe and backend.on_gpu_path(x):
            from qwen35.kernels import triton_moe

            return triton_moe.route(logits.contiguous(), self.top_k, x.dtype)
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E] fp32
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        return top_w.to(x.dtype), top_idx

    def cpu_step(self):
        """ops/moe.py `cpu_moe_step` on this block's weights (the one-call CPU step for a few
        bf16 rows), or None: LoRA adapters on the router or shared expert, an unpacked shared
        expert, experts it does not read. Built per call by forward; models/cpu_decode.py
        resolves it once."""
        sh = self.shared_expert
        linears = (self.gate, self.shared_expert_gate, sh.gate_proj, sh.up_proj, sh.down_proj)
        if any(lin.lora is not None for lin in linears):  # (attached: the plan outlives a step)
            return None
        shared = (self.shared_expert_gate.weight, sh.packed_gate_up, sh.down_proj.weight)
        return cpu_moe_step(self.gate.weight, self.top_k, self.experts.fused_weights(), shared)

    def cpu_routed(self, x: torch.Tensor) -> torch.Tensor | None:
        """The routed experts of a few CPU rows by ops/moe.py `few_token_moe` (routing and the
        weighted sum in C++, the experts by their kernels), or None: an adapter on the router,
        only some experts here (expert parallelism), rows it does not take."""
        ex = self.experts
        if self.gate.lora is not None or ex.num_total is not None:
            return None
        if type(ex) is Experts:  # plain weights: layers/linear.py's GEMVs, as routed_experts
            gu, dn = ex.gate_up_proj, ex.down_proj
            return few_token_moe(x, self.gate.weight, self.top_k, lambda v, e: linear(v, gu[e]),
                                 lambda h, e: linear(h, dn[e]), plain_many(gu, dn))  # fmt: skip
        return few_token_moe(x, self.gate.weight, self.top_k, ex.gate_up, ex.down, ex.many)

    def forward(self, x: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """[T, H] -> [T, H]; backend None: the reference expert loop."""
        sh = self.shared_expert
        if (  # a few bf16 rows with the CPU kernels: one call (ops/moe.py cpu_moe_step)
            backend is not None
            and backend.cpu_kernels is not None
            and cpu_moe_takes(x)
            and (step := self.cpu_step()) is not None
        ):
            return self.tp.all_reduce(step(x))
        if (  # <= 16 tokens on the GPU: Triton, reading the router's and shared expert's weights
            backend is not None
            and backend.triton_moe
            and not adapted(self.gate, self.shared_expert_gate, sh.gate_proj, sh.up_proj,
                            sh.down_proj)  # fmt: skip
        ):
            shared = (
                self.shared_expert_gate.weight,
                lambda x: packed_linear(x, sh.packed_gate_up, sh.gate_proj, sh.up_proj),
                sh.down_proj.weight,
                getattr(sh.down_proj, "weight_scale_inv", None),  # FP8 (quant/layers.py)
            )
            y = fused_moe(backend, x, self.gate.weight, self.top_k, self.experts.fused_weights(),
                          shared, packed=self.packed_router)  # fmt: skip
            if y is not None:
                return self.tp.all_reduce(y)
        routed = None  # (more tokens, or experts the fused paths do not read)
        if backend is not None and backend.cpu_kernels is not None:
            routed = self.cpu_routed(x)
        if routed is None:
            top_w, top_idx = self.route(x, backend)
            routed = self.experts(x, top_idx, top_w, backend)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, backend)
        return self.tp.all_reduce(routed + shared)  # one all-reduce under tensor parallelism
