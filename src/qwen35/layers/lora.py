"""LoRA adapters served per request (`--lora-modules name=path`): the model side.

An adapted linear layer computes y = x W^T + sum over the step's adapters of
s * (x_rows A^T) B^T for the rows of the sequences that use that adapter (A [r, in], B [out, r],
s = lora_alpha / r, folded into B at load). The base weights stay shared and untouched, so one
batch mixes requests of several adapters and of the base model.

`LoraStep` is one object per model, shared by every adapted linear: the model's forward sets
its `groups` (adapter id -> its rows of the step, from the runner's ForwardBatch.lora) for the
duration of a forward, so the linears need no extra argument. `LoraDelta` is a linear's
adapters (id -> A, s*B), attached as `linear.lora`; layers/linear.py `Linear.forward` and
`packed_linear` add it, and the CPU decode plan (models/cpu_decode.py) after the kernels it
resolved. Steps with LoRA rows run no CUDA graph and no fused GPU MoE over the router / shared
expert weights (those read the weights directly).
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
    """One linear layer's adapters: adapter id -> (A [r, in], (s * B)^T [r, out]) on the
    model's device, in fp32 on a CPU (the products are tiny, r rows, and fp32 ones are ~3x
    faster there than bf16 ones, whose oneDNN set-up dominates; more exact too), else in the
    model's dtype (half the memory: a rank-16 adapter on every projection of a 9B is ~0.27 GB
    in fp32). B transposed: x_A @ B^T from a contiguous [r, out] is ~2.5x faster for a decode
    row than F.linear on B [out, r] (MKL, 2 threads, r 16, out 3,584: 5.5 vs 15 us)."""

    __slots__ = ("step", "pairs")

    def __init__(self, step: LoraStep) -> None:
        self.step = step
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_to(self, x: torch.Tensor, y: torch.Tensor, xf: torch.Tensor | None = None) -> None:
        """y [T, out] += the delta of each of the step's adapters on its rows of x [T, in]
        (in place: y may be a column view of a packed projection's output); xf: x in the
        adapters' dtype, when the caller has it (the projections of one input)."""
        groups = self.step.groups
        if not groups:
            return
        for aid, rows in groups:
            pair = self.pairs.get(aid)
            if pair is None:  # this adapter does not adapt this layer
                continue
            a, bt = pair
            if xf is None:
                xf = x.to(a.dtype)
            if rows is None:
                y.add_(torch.mm(F.linear(xf, a), bt))
            else:
                d = torch.mm(F.linear(xf.index_select(0, rows), a), bt)
                y.index_add_(0, rows, d.to(y.dtype))


def add_lora(x: torch.Tensor, outs, linears) -> None:
    """The step's LoRA deltas of `linears` (those carrying adapters) added to their outputs
    `outs` of the input x (x converted to the adapters' dtype once for all of them)."""
    xf = None
    for lin, y in zip(linears, outs, strict=True):
        d = lin.lora
        if d is not None and d.step.groups and d.pairs:
            if xf is None:
                xf = x.to(next(iter(d.pairs.values()))[0].dtype)
            d.add_to(x, y, xf)


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
    device = model.device
    dtype = torch.float32 if device.type == "cpu" else model.dtype  # (LoraDelta)
    try:  # every tensor on the device first: running out of memory attaches nothing
        weights = [
            (mod, p.a.to(device=device, dtype=dtype).contiguous(),
             (p.b.float() * p.scale).t().contiguous().to(device=device, dtype=dtype))
            for mod, p in plan
        ]  # fmt: skip
    except torch.OutOfMemoryError:
        raise LoraError(
            f"not enough {device.type} memory for the adapter's weights: unload another adapter "
            "or leave memory free (--max-memory)"
        ) from None
    nbytes = 0
    for mod, a, bt in weights:
        if mod.lora is None:
            mod.lora = LoraDelta(model.lora_step)
        mod.lora.pairs[aid] = (a, bt)
        nbytes += a.numel() * a.element_size() + bt.numel() * bt.element_size()
    model._decode_plan = None  # models/cpu_decode.py binds each linear's adapters: rebuilt
    return nbytes


def detach(model, aid: int) -> None:
    """Drop adapter `aid` from every linear layer."""
    for mod in model.modules():
        d = getattr(mod, "lora", None)
        if isinstance(d, LoraDelta):
            d.pairs.pop(aid, None)
            if not d.pairs:
                mod.lora = None
    model._decode_plan = None
