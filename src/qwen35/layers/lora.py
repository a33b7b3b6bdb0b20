"""LoRA adapters served per request (`--lora-modules name=path`): the model side.

An adapted linear layer computes y = x W^T + sum over the step's adapters of
s * (x_rows A^T) B^T for the rows of the sequences that use that adapter (A [r, in], B [out, r],
s = lora_alpha / r, folded into B at load). The base weights stay shared and untouched, so one
batch mixes requests of several adapters and of the base model.

`LoraStep` is one object per model, shared by every adapted linear: the model's forward sets
its `groups` (adapter id -> its rows of the step, from the runner's ForwardBatch.lora) for the
duration of a forward, so the linears need no extra argument. `LoraDelta` is a linear's
adapters (id -> A, s*B), attached as `linear.lora`; layers/linear.py `Linear.forward` and
`packed_linear` add it. Steps with LoRA rows take the module path (no CPU decode plan, no CUDA
graph, no fused GPU MoE over the router / shared expert weights: they read weights directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LoraStep:
    """The current forward's rows per adapter: [(adapter id, rows [n] int64 or None for all
    rows)], or None when no row of the step uses an adapter."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] | None = None


class LoraDelta:
    """One linear layer's adapters: adapter id -> (A [r, in], s * B [out, r]) in fp32 on the
    model's device. fp32 whatever the model's dtype: the products are tiny (r rows), and on a
    CPU fp32 ones are ~3x faster than bf16 ones (oneDNN's bf16 set-up dominates: bench/lora.py),
    besides more exact."""

    __slots__ = ("step", "pairs")

    def __init__(self, step: LoraStep) -> None:
        self.step = step
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y [T, out] += the delta of each of the step's adapters on its rows of x [T, in]
        (in place: y may be a column view of a packed projection's output)."""
        groups = self.step.groups
        if not groups:
            return
        xf = None
        for aid, rows in groups:
            pair = self.pairs.get(aid)
            if pair is None:  # this adapter does not adapt this layer
                continue
            a, b = pair
            if xf is None:
                xf = x.float()
            if rows is None:
                y.add_(F.linear(F.linear(xf, a), b))
            else:
                d = F.linear(F.linear(xf.index_select(0, rows), a), b)
                y.index_add_(0, rows, d.to(y.dtype))


def adapted(*linears) -> bool:
    """True while the current step adds an adapter to any of these linears (their weights must
    then not be read directly by a fused kernel)."""
    for lin in linears:
        d = getattr(lin, "lora", None)
        if d is not None and d.step.groups and any(aid in d.pairs for aid, _ in d.step.groups):
            return True
    return False


def attach(model, aid: int, adapter) -> int:
    """Attach a checked PEFT adapter (qwen35/lora.py LoraAdapter) to the model's linear layers
    under id `aid`; all or nothing: every module is matched before any is attached. Returns the
    bytes its weights take on the model's device."""
    from qwen35.layers.linear import Linear
    from qwen35.lora import LoraError

    plan = []
    for key, p in adapter.pairs.items():
        name = key.removesuffix(".weight")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if not name.startswith("model.layers.") or not isinstance(mod, Linear):
            raise LoraError(
                f"the adapter's {p.module} is not a linear layer of the decoder this engine can "
                "adapt per request (attention, DeltaNet and MLP projections, the router, the "
                "shared expert): an adapter for another model, or one on the vision tower / "
                "lm_head / experts; merge it instead: qwen35 quantize --lora"
            )
        want = (mod.out_features, mod.in_features)
        if (p.b.shape[0], p.a.shape[1]) != want:
            raise LoraError(
                f"the adapter's {p.module} is [{p.b.shape[0]}, {p.a.shape[1]}] but the model's "
                f"{name} is [{want[0]}, {want[1]}]: an adapter for another model?"
            )
        plan.append((mod, p))
    step = model.lora_step
    device = model.device
    nbytes = 0
    for mod, p in plan:
        if mod.lora is None:
            mod.lora = LoraDelta(step)
        a = p.a.to(device=device, dtype=torch.float32)
        b = (p.b.float() * p.scale).to(device=device)
        mod.lora.pairs[aid] = (a, b)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return nbytes


def detach(model, aid: int) -> None:
    """Drop adapter `aid` from every linear layer."""
    for mod in model.modules():
        d = getattr(mod, "lora", None)
        if isinstance(d, LoraDelta):
            d.pairs.pop(aid, None)
            if not d.pairs:
                mod.lora = None
