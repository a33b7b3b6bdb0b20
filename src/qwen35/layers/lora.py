"""LoRA adapters served per request (`--lora-modules name=path`): the model side.

An adapted linear layer computes y = x W^T + sum over the step's adapters of
s * (x_rows A^T) B^T for the rows of the sequences that use that adapter (A [r, in], B [out, r],
s = lora_alpha / r, folded into B at load). The base weights stay shared and untouched, so one
batch mixes requests of several adapters and of the base model.

`LoraStep` is one object per model, shared by every adapted linear: the model's forward sets
it from the runner's ForwardBatch for the duration of a forward, so the linears need no extra
argument. Two ways to hold the adapters, chosen per engine (engine/lora_adapters.py):
- per adapter (CPUs): `LoraDelta` on each adapted linear (adapter id -> A, (s B)^T), the step's
  rows grouped by adapter (`LoraStep.groups`); each group costs two products of its own rows.
- stacked (GPUs): `LoraSlots` on every adaptable linear, max_loras x max_lora_rank rows
  allocated at start, the step's adapter slot per row (`LoraStep.slots`): two dense products
  over all slots, masked per row; capturable by CUDA graphs.
layers/linear.py `Linear.forward` and `packed_linear` add them, and the CPU decode plan
(models/cpu_decode.py) after the kernels it resolved. Steps with adapters run no fused GPU MoE
over the router / shared expert weights (it reads those weights directly); per-adapter steps
run no CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LoraStep:
    """The current forward's rows per adapter. Per-adapter mode (LoraDelta): `groups`, [(adapter
    id, rows [n] int64 or None for all rows)]; stacked mode (LoraSlots): `slots`, each row's
    adapter slot [T] int64 (0: none), a device tensor a CUDA graph reads. None: no row uses an
    adapter."""

    __slots__ = ("groups", "slots", "stacked")

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] | None = None
        self.slots: torch.Tensor | None = None
        self.stacked = False  # the model's adapters are LoraSlots (init_slots)


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

    @property
    def active(self) -> bool:
        groups = self.step.groups
        return bool(groups) and any(aid in self.pairs for aid, _ in groups)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.pairs.values()))[0].dtype

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


class LoraSlots:
    """One linear layer's adapters stacked for a GPU: slot j (1 .. S) holds an adapter's A in
    rows (j-1) R .. j R - 1 of `a` [S R, in] and its (s B)^T in those of `bt` [S R, out] (R:
    max_lora_rank; smaller ranks and layers an adapter does not adapt are zero rows), in the
    model's dtype, allocated once. A step is then two dense products whatever its adapters:
    h = x A^T [T, S R], each row's h kept only in its own slot's columns, y += h Bt: no host
    sync and static shapes, so CUDA graphs capture it (the slot of each row is a device tensor,
    LoraStep.slots); loading an adapter writes its slot in place, which the graphs then read."""

    __slots__ = ("step", "a", "bt", "col_slot", "rank")

    def __init__(self, step: LoraStep, lin, num_slots: int, rank: int, dtype, device) -> None:
        self.step, self.rank = step, rank
        n = num_slots * rank
        self.a = torch.zeros(n, lin.in_features, dtype=dtype, device=device)
        self.bt = torch.zeros(n, lin.out_features, dtype=dtype, device=device)
        # the slot each column of h belongs to: 1 .. S
        self.col_slot = torch.arange(1, num_slots + 1, device=device).repeat_interleave(rank)

    @property
    def active(self) -> bool:
        return self.step.slots is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.bt.numel()) * self.a.element_size()

    def add_to(self, x: torch.Tensor, y: torch.Tensor, xf: torch.Tensor | None = None) -> None:
        slots = self.step.slots
        if slots is None:
            return
        xf = x.to(self.a.dtype) if xf is None else xf
        h = F.linear(xf, self.a)  # [T, S R]
        h = h * (self.col_slot == slots[:, None])  # each row: its own adapter's columns only
        y.add_(torch.mm(h, self.bt).to(y.dtype))

    def write(self, slot: int, a: torch.Tensor | None, bt: torch.Tensor | None) -> None:
        """Slot `slot`'s rows: A [r, in] and (s B)^T [r, out] (r <= R), or zeros (None)."""
        rows = slice((slot - 1) * self.rank, slot * self.rank)
        self.a[rows].zero_()
        self.bt[rows].zero_()
        if a is not None:
            self.a[rows][: a.shape[0]].copy_(a)
            self.bt[rows][: bt.shape[0]].copy_(bt)


def add_lora(x: torch.Tensor, outs, linears) -> None:
    """The step's LoRA deltas of `linears` (those carrying adapters) added to their outputs
    `outs` of the input x (x converted to the adapters' dtype once for all of them)."""
    xf = None
    for lin, y in zip(linears, outs, strict=True):
        d = lin.lora
        if d is not None and d.active:
            if xf is None:
                xf = x.to(d.dtype)
            d.add_to(x, y, xf)


def adapted(*linears) -> bool:
    """True while the current step adds an adapter to any of these linears (their weights must
    then not be read directly by a fused kernel)."""
    return any(getattr(lin, "lora", None) is not None and lin.lora.active for lin in linears)


def _is_adaptable(name: str, mod) -> bool:
    """A linear layer an adapter may target: the decoder's."""
    from qwen35.layers.linear import Linear

    return name.startswith("model.layers.") and isinstance(mod, Linear)


def adaptable(model):
    """(name, module) of every linear layer an adapter may target."""
    for name, mod in model.named_modules():
        if _is_adaptable(name, mod):
            yield name, mod


def init_slots(model, num_slots: int, rank: int) -> int:
    """Stacked mode (LoraSlots on every adaptable linear, all slots empty); returns the bytes
    allocated."""
    step = model.lora_step
    step.stacked = True
    dtype, device = model.dtype, model.device
    total = 0
    for _, mod in adaptable(model):
        mod.lora = LoraSlots(step, mod, num_slots, rank, dtype, device)
        total += mod.lora.nbytes
    model._decode_plan = None
    return total


def attach_slot(model, slot: int, adapter) -> None:
    """Write a checked adapter into slot `slot` of every adaptable linear (zeros where it adapts
    nothing); refused if its rank exceeds the slots' (init_slots)."""
    from qwen35.lora import LoraError

    pairs = {mod: (a, bt) for mod, a, bt in _matched(model, adapter)}
    r = max(a.shape[0] for a, _ in pairs.values())
    max_rank = next(mod.lora.rank for _, mod in adaptable(model))
    if r > max_rank:
        raise LoraError(
            f"the adapter's rank is {r} but this engine's LoRA slots hold rank {max_rank}: "
            f"start it with --max-lora-rank {r} or more"
        )
    for _, mod in adaptable(model):
        a, bt = pairs.get(mod, (None, None))
        mod.lora.write(slot, a, bt)


def _matched(model, adapter):
    """(module, A [r, in], (s B)^T [r, out]) in fp32 for every pair of the adapter, this
    tensor-parallel rank's part of them (parallel/shard.py's rule of the module's weight:
    output rows split -> B's rows, input columns split -> A's columns, whose partial products
    the layer's all-reduce sums with its own); refuses (LoraError) any pair that is not an
    adaptable linear of the right shape."""
    from qwen35.lora import LoraError
    from qwen35.parallel.shard import shard_rule

    tp = model.tp
    plan = []
    for key, p in adapter.pairs.items():
        name = key.removesuffix(".weight")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if not _is_adaptable(name, mod):
            raise LoraError(
                f"the adapter's {p.module} is not a linear layer of the decoder this engine can "
                "adapt per request (attention, DeltaNet and MLP projections, the router, the "
                "shared expert): an adapter for another model, or one on the vision tower / "
                "lm_head / experts; merge it instead: qwen35 quantize --lora"
            )
        a, b = p.a.float(), p.b.float() * p.scale
        full = (b.shape[0], a.shape[1])
        rule = shard_rule(key, full, model.config, tp.rank, tp.size, tp.expert_parallel)
        if rule is not None and all(s + n <= full[rule.dim] for s, n in rule.pieces):
            if rule.dim == 0:
                b = torch.cat([b[s : s + n] for s, n in rule.pieces])
            else:
                a = torch.cat([a[:, s : s + n] for s, n in rule.pieces], dim=1)
        want = (mod.out_features, mod.in_features)
        if (b.shape[0], a.shape[1]) != want:
            shown = f"[{want[0]}, {want[1]}]" + (f" (rank {tp.rank} of {tp.size})" if tp.size > 1 else "")
            raise LoraError(
                f"the adapter's {p.module} is [{full[0]}, {full[1]}] but the model's {name} is "
                f"{shown}: an adapter for another model?"
            )
        plan.append((mod, a, b.t()))
    return plan


def attach(model, aid: int, adapter) -> int:
    """Attach a checked PEFT adapter (qwen35/lora.py LoraAdapter) to the model's linear layers
    under id `aid`; all or nothing: every module is matched before any is attached. Returns the
    bytes its weights take on the model's device."""
    from qwen35.lora import LoraError

    plan = _matched(model, adapter)
    device = model.device
    dtype = torch.float32 if device.type == "cpu" else model.dtype  # (LoraDelta)
    try:  # every tensor on the device first: running out of memory attaches nothing
        weights = [
            (mod, a.to(device=device, dtype=dtype).contiguous(),
             bt.contiguous().to(device=device, dtype=dtype))
            for mod, a, bt in plan
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


def detach_slot(model, slot: int) -> None:
    """Zero slot `slot` of every adaptable linear (stacked mode)."""
    for _, mod in adaptable(model):
        mod.lora.write(slot, None, None)


def detach(model, aid: int) -> None:
    """Drop adapter `aid` from every linear layer."""
    for mod in model.modules():
        d = getattr(mod, "lora", None)
        if isinstance(d, LoraDelta):
            d.pairs.pop(aid, None)
            if not d.pairs:
                mod.lora = None
    model._decode_plan = None
