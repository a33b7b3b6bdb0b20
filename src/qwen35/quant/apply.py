"""Which modules are quantized, and swapping them into a model.

- `fp8_rule(cfg)`: the official FP8 releases' rule (plan/params.py: attention q/k/v/o, GDN
  in_proj_qkv / in_proj_z / out_proj, MLP and expert projections; everything else BF16), less
  `modules_to_not_convert`. In-memory FP8 and `qwen35 quantize --to fp8` use it, and so does the
  planner's FP8 figure.
- `fp8_layout_from_checkpoint`: loading an FP8 checkpoint, the modules stored in FP8 are read
  from the safetensors headers (a weight in F8_E4M3 or a `*_scale_inv` beside it) and swapped,
  still on the meta device, for FP8 modules whose parameters carry the checkpoint's names; the
  strict scan then checks every weight, scale, shape and dtype before any data is read.
- `bf16_storage_meta(model, dtype)`: `--quantization bf16`, on meta before loading: weights
  stored in bf16, computed in fp32 (CPUs without native bf16 arithmetic).
- `quantize_model_(model, fmt)`: after loading, BF16 (or FP8) weights -> fp8 / int8 / int4.
  int8 / int4 cover the FP8 set plus lm_head and the embedding (per-row int8, but lm_head int6
  under int4: `plan.params.head_format`; one shared tensor when tied: the 0.8B's tied head is a
  third of its bytes); int4 needs out % 64 == 0 and in % 32 == 0 (torch's CPU layout), other
  matrices get int8 (`plan.params.int4_group`). Both rules are the ones the planner counts with.
- `QuantizeOnRead`: the same conversions module by module while the loader reads (or draws)
  the weights, so the BF16 model is never whole in memory; quantize_model_ then finds them done.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qwen35 import heap
from qwen35.layers.linear import Linear
from qwen35.layers.moe import Experts
from qwen35.plan.params import (  # (fp8_block: the FP8 scale block the engine holds)
    fp8_block,
    head_format,
    int4_group,
    lattice_rows_ok,
    text_tensors,
)
from qwen35.quant import formats
from qwen35.quant.formats import Int8Rows, Lattice
from qwen35.quant.layers import (
    Fp8Experts,
    Fp8Linear,
    Int4Linear,
    Int6Embedding,
    Int6Linear,
    Int8Embedding,
    Int8Linear,
    IntExperts,
    qparam,
)

FORMATS = ("fp8", "int8", "int4")
_LAYER = re.compile(r"^(?:model|mtp)\.layers\.\d+\.")  # the MTP head's layer too


def fp8_rule(cfg) -> set[str]:
    """Module suffixes inside a decoder layer that the FP8 format quantizes."""
    out = set()
    for t in text_tensors(cfg):
        if not t.fp8:
            continue
        suffix = t.name.split("layers.{i}.", 1)[1].removesuffix(".weight")
        out.add(re.sub(r"\.experts\.\{e\}\..*$", ".experts", suffix))
    return out


def _excluded(name: str, cfg) -> bool:
    q = cfg.quantization
    skip = q.modules_to_not_convert if q is not None else ()
    official = name.replace("model.", "model.language_model.", 1)
    return any(m and (m in name or m in official) for m in skip)


def rule_modules(model: nn.Module, cfg) -> list[str]:
    """Names of the model's modules that the FP8 rule quantizes."""
    rule = fp8_rule(cfg)
    return [
        n
        for n, _ in model.named_modules()
        if _LAYER.match(n) and _LAYER.sub("", n) in rule and not _excluded(n, cfg)
    ]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace module `name` (quantized experts keep the expert-parallel placement)."""
    parent, _, leaf = name.rpartition(".")
    old = model.get_submodule(name)
    if isinstance(old, Experts) and isinstance(new, Experts):
        from qwen35.parallel.experts import same_place

        same_place(new, old)
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _to_fp8_meta(mod: nn.Module, block) -> nn.Module | None:
    if isinstance(mod, Experts) and not isinstance(mod, Fp8Experts):
        E, twoI, H = mod.gate_up_proj.shape
        return Fp8Experts(E, H, twoI // 2, block, device="meta")
    if type(mod) is Linear:
        return Fp8Linear(mod.in_features, mod.out_features, block, device="meta")
    return None


# ---- loading an FP8 checkpoint ----------------------------------------------------------------
def fp8_layout_from_checkpoint(model: nn.Module, cfg, files) -> list[str]:
    """Swap (on meta) every module the checkpoint stores in FP8; returns their names."""
    return swap_to_fp8_meta(model, fp8_modules_in_checkpoint(cfg, files), cfg)


def fp8_modules_in_checkpoint(cfg, files) -> list[str]:
    """Names of the modules an FP8 checkpoint stores in FP8 (from its headers)."""
    from qwen35.weights import CheckpointError, map_key, open_safetensors

    block = cfg.quantization.weight_block_size
    names: set[str] = set()
    fused_scales = []
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                t = map_key(key, keep_mtp=True)  # (names the model lacks: not swapped)
                if isinstance(t, str):
                    continue
                p = t.param
                if p.endswith("_scale_inv") or f.get_slice(key).get_dtype() == "F8_E4M3":
                    base = re.sub(r"(\.weight|\.weight_scale_inv|_scale_inv)$", "", p)
                    base = re.sub(r"\.experts\.(gate_up_proj|down_proj)$", ".experts", base)
                    names.add(base)
                    if p.endswith("experts.gate_up_proj_scale_inv") and t.expert is None:
                        fused_scales.append(key)
    if fused_scales and cfg.moe_intermediate_size % block[0]:
        raise CheckpointError(
            f"{fused_scales[0]}: fused FP8 experts need moe_intermediate_size "
            f"({cfg.moe_intermediate_size}) to be a multiple of {block[0]} (gate and up share "
            "scale blocks otherwise); store the experts per expert"
        )
    return sorted(names)


def swap_to_fp8_meta(model: nn.Module, names, cfg) -> list[str]:
    """Swap the named modules (on meta) for FP8 ones of the same (local) sizes; returns the
    names swapped (a name the model lacks is left to the checkpoint scan to report)."""
    block = fp8_block(cfg)
    swapped = []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        new = _to_fp8_meta(mod, block)
        if new is not None:
            _set(model, name, new)
            swapped.append(name)
    return swapped


# ---- bf16 storage, fp32 compute ------------------------------------------------------------------
def bf16_storage_meta(model: nn.Module, dtype: torch.dtype) -> int:
    """`--quantization bf16` on a model built on meta to compute in `dtype` (fp32): every plain
    Linear weight, the routed experts and the embedding table (the tied head with it) are
    allocated in bf16 instead, so the loader reads a BF16 checkpoint into them as stored (never
    an fp32 copy of the model) and decode reads 2 bytes a weight; so are the vision tower's
    projection weights (widened per call: encoding is compute-bound). Norms, conv, biases,
    A_log / dt_bias, the caches and all activations stay in `dtype`. Returns the number of
    tensors so stored."""
    from qwen35.models.qwen3_5 import Embedding
    from qwen35.models.vision import BiasLinear
    from qwen35.quant.layers import Bf16Experts

    narrowed: dict[int, nn.Parameter] = {}  # one bf16 parameter per old one: ties stay tied
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) in (Linear, Embedding, BiasLinear):  # (the vision tower's: weights only)
            old = mod.weight
            if id(old) not in narrowed:
                narrowed[id(old)] = qparam(torch.empty(old.shape, dtype=torch.bfloat16,
                                                       device="meta"))  # fmt: skip
                n += 1
            mod.weight = narrowed[id(old)]
            if type(mod) is Embedding:
                mod.out_dtype = dtype
        elif type(mod) is Experts:
            E, twoI, H = mod.gate_up_proj.shape
            _set(model, name, Bf16Experts(E, H, twoI // 2, device="meta"))
            n += 2
    return n


# ---- in memory ----------------------------------------------------------------------------------
def _dense(mod: nn.Module, dtype) -> torch.Tensor:
    return mod.dequantized(dtype) if hasattr(mod, "dequantized") else mod.weight.detach()


def _int_linear(w: torch.Tensor | None, fmt: str, dtype, hint=None) -> Linear:
    """hint: what the source file stored (gguf_checkpoint.int4_hint, compressed_tensors.py):
    Int8Rows (8-bit values and their row scales: held as stored under int8 and int4); under
    int4, "int8" (a GGUF tensor of more than 5 bits a weight, kept faithful rather than cut to
    4) or a Lattice (4-bit lattices and codes, whose values are kept as they are). From the
    codes alone, w is not read (None: QuantizeOnRead.skips_values)."""
    if isinstance(hint, Int8Rows):
        return Int8Linear(hint.q.contiguous(), hint.scale.to(dtype).contiguous())
    if fmt == "int4" and hint == "int8":
        return Int8Linear.quantize(w, dtype)
    if fmt == "int4" and isinstance(hint, Lattice) and lattice_rows_ok(hint.step.shape[0]):
        return Int4Linear.on_lattice(w, hint.step, hint.zero, dtype, codes=hint.codes)
    g = int4_group(*w.shape) if fmt == "int4" else None
    return Int4Linear.quantize(w, g, dtype) if g else Int8Linear.quantize(w, dtype)


def takes_lattice(mod: nn.Module, leaf: str, fmt: str, hint=None, block=None) -> bool:
    """Whether quantize_module_ makes parameter `leaf` of `mod` from a hint alone (its codes),
    never reading the parameter's values: as _int_linear / _int_experts decide (a Lattice under
    int4, Int8Rows under int8 / int4), or quantize_module_'s FP8 branch (a Lattice that FP8 in
    `block`s holds exactly: formats.fp8_on_lattice; a dense weight, or an expert's slice)."""
    if fmt == "fp8":
        ours = (type(mod) is Linear and leaf == "weight") or (
            leaf in ("gate_up_proj", "down_proj") and isinstance(mod, Experts)
            and not isinstance(mod, (Fp8Experts, IntExperts)))  # fmt: skip
        return ours and formats.fp8_on_lattice(hint, block) is not None
    if fmt not in ("int4", "int8") or (fmt == "int8" and not isinstance(hint, Int8Rows)):
        return False
    rows_ok = (lambda n: True) if isinstance(hint, Int8Rows) else lattice_rows_ok
    if isinstance(mod, Experts) and not isinstance(mod, (Fp8Experts, IntExperts)):
        I, H = mod.intermediate_size, mod.gate_up_proj.shape[2]
        if leaf == "gate_up_proj":
            return (int4_group(I, H) is not None or isinstance(hint, Int8Rows)) and rows_ok(2 * I)
        return leaf == "down_proj" and rows_ok(H)
    return type(mod) is Linear and leaf == "weight" and rows_ok(mod.out_features)


def _on(hint, device: torch.device):
    """A hint's tensors on `device` (a GPU load's: the file's codes and scales are read on the
    CPU, and the modules made of them must live with the model)."""
    if isinstance(hint, (Lattice, Int8Rows)):
        return type(hint)(*(t if t is None else t.to(device) for t in hint))
    return hint


def _part(hint, e: int):
    """Expert e's hint of a [E, ...] one."""
    if isinstance(hint, (Lattice, Int8Rows)):
        return type(hint)(*(t if t is None else t[e] for t in hint))
    return hint


def _int_experts(mod: Experts, fmt: str, dtype, hints: dict | None = None) -> IntExperts:
    if isinstance(mod, Fp8Experts):
        gu, dn = mod.dequantized(dtype)
    else:
        gu, dn = mod.gate_up_proj.detach(), mod.down_proj.detach()
    I, H = mod.intermediate_size, gu.shape[2]
    gu_fmt = fmt if int4_group(I, H) else "int8"  # as the planner counts gate and up
    hints = hints or {}
    gate_up, down = [], []
    for e in range(gu.shape[0]):
        gate_up.append(_int_linear(gu[e], gu_fmt, dtype, _part(hints.get("gate_up_proj"), e)))
        down.append(_int_linear(dn[e], fmt, dtype, _part(hints.get("down_proj"), e)))
        if e % 32 == 31 and gu.device.type == "cpu":
            heap.release()  # each expert's temporaries, freed into the heap (qwen35/heap.py)
    ex = IntExperts(gate_up, down, mod.intermediate_size)
    if gate_up[0].weight.is_cuda:  # one tensor a projection: the GPU's MoE kernels (int_gpu.py)
        ex.stack_()
    return ex


def check_format(fmt: str) -> None:
    from qwen35.errors import Qwen35Error

    if fmt not in FORMATS:
        raise Qwen35Error(f"unknown quantization {fmt!r}; use one of {', '.join(FORMATS)}")


_INT = (Int8Linear, Int4Linear, IntExperts)


@torch.no_grad()
def quantize_module_(model: nn.Module, name: str, fmt: str, dtype, block, hints=None) -> None:
    """Rule module `name` to `fmt` in place; a module already in the format is left alone.
    hints: {parameter leaf name: hint} (_int_linear), from a GGUF file (QuantizeOnRead)."""
    hints = hints or {}
    mod = model.get_submodule(name)
    if fmt == "fp8":
        if isinstance(mod, Experts) and not isinstance(mod, Fp8Experts):
            exact = [formats.fp8_on_lattice(hints.get(p), block)
                     for p in ("gate_up_proj", "down_proj")]  # fmt: skip
            if all(exact):  # 4-bit values held exactly (a GPTQ / AWQ / w4a16 checkpoint's)
                _set(model, name, Fp8Experts.from_blocks(*exact, block))
            else:  # from the values, but a projection held exactly from its codes (their
                ex = Fp8Experts.quantize(mod, block)  # values may not have been read)
                for which, got in zip(("gate_up_proj", "down_proj"), exact, strict=True):
                    if got is not None:
                        getattr(ex, which).data.copy_(got[0])
                        getattr(ex, which + "_scale_inv").data.copy_(got[1])
                _set(model, name, ex)
        elif type(mod) is Linear:
            exact = formats.fp8_on_lattice(hints.get("weight"), block)
            _set(model, name, Fp8Linear.from_blocks(*exact, block) if exact else
                 Fp8Linear.quantize(mod.weight.detach(), block))  # fmt: skip
    elif isinstance(mod, _INT):
        return
    elif isinstance(mod, Experts):
        _set(model, name, _int_experts(mod, fmt, dtype, hints))
    else:
        _set(model, name, _int_linear(_dense(mod, dtype), fmt, dtype, hints.get("weight")))


@torch.no_grad()
def quantize_model_(model: nn.Module, fmt: str, dtype: torch.dtype | None = None) -> None:
    """Quantize a loaded model in place (before post_load packs the projections); modules that
    QuantizeOnRead already quantized stay as they are."""
    cfg = model.config
    check_format(fmt)
    dtype = dtype or model.model.norm.weight.dtype
    block = fp8_block(cfg)
    for name in rule_modules(model, cfg):
        quantize_module_(model, name, fmt, dtype, block)
    if fmt in ("int8", "int4"):
        quantize_vocab_(model, dtype, "lm_head", fmt)
        quantize_vocab_(model, dtype, "model.embed_tokens", fmt)
    model.quantization = fmt


VOCAB = ("model.embed_tokens", "lm_head")  # per-row int8 under int8; under int4 the head int6


@torch.no_grad()
def quantize_vocab_(model: nn.Module, dtype, name: str, fmt: str = "int8") -> None:
    """lm_head (head_format) or the embedding (per-row int8) to their formats; a tied pair both
    from the head's one matrix. Unless already done."""
    emb, head = model.model.embed_tokens, model.lm_head
    heads = (Int8Linear, Int6Linear)
    if isinstance(emb if name == "model.embed_tokens" else head,
                  (Int8Embedding, Int6Embedding, *heads)):  # fmt: skip
        return
    tied = not isinstance(head, heads) and head.weight is emb.weight
    if name == "lm_head" or tied:
        w = head.weight.detach()
        model.lm_head = head = (Int6Linear.quantize(w) if head_format(fmt, w.shape[1]) == "int6"
                                else Int8Linear.quantize(w, dtype))  # fmt: skip
    if name == "model.embed_tokens" or tied:
        if tied:
            kind = Int6Embedding if isinstance(head, Int6Linear) else Int8Embedding
            model.model.embed_tokens = kind(head, dtype)
        else:
            model.model.embed_tokens = Int8Embedding(Int8Linear.quantize(emb.weight.detach(), dtype),
                                                     dtype)  # fmt: skip


# ---- while loading ------------------------------------------------------------------------------
class QuantizeOnRead:
    """Quantizes each module as soon as its weights are read, so that loading never holds the
    whole model in BF16 (27B to int4: ~14.5 GiB at the end, 51 GiB in BF16 before). The loader
    leaves the modules' weights on the meta device (`deferred`), allocates each when its first
    tensor arrives (`allocate`) and reports every tensor written (`written`); once all of a
    module's tensors are in, it becomes the module quantize_model_ would have made of it (the
    same functions, the same values) and its BF16 weights are dropped. Peak memory: the
    quantized model plus the modules in flight (a module's tensors are next to each other in
    the checkpoint's files; plan/cpu.py load_peak_bytes counts the largest).
    The modules: rule_modules, BF16 or (an official FP8 checkpoint to int8 / int4) FP8; under
    int8 / int4 also lm_head and the embedding (`vocab`; the loader leaves them to the end where
    their BF16 values are still needed: a tied head's stored duplicate is compared with the
    embedding, tensor parallelism zeroes the vocabulary's padding rows)."""

    RELEASE_EVERY = 1 << 30  # bytes of unquantized weights freed between two heap.release()

    def __init__(self, model: nn.Module, cfg, fmt: str, dtype, device, alloc, vocab: bool = True):
        check_format(fmt)
        self.model, self.fmt, self.dtype, self.alloc = model, fmt, dtype, alloc
        self.device = torch.device(device)  # (the hints are read on the CPU: moved there)
        self.freed = 0
        self.block = fp8_block(cfg)
        self.owner: dict[str, str] = {}  # deferred parameter -> its module
        self.left: dict[str, set[str]] = {}  # module -> its parameters not complete yet
        names = rule_modules(model, cfg)
        if vocab and fmt in ("int8", "int4"):
            names += VOCAB  # (tied: one parameter, which names it first)
        seen: set[int] = set()
        for name in names:
            mod = model.get_submodule(name)
            if not isinstance(mod, (Linear, Experts)) and name not in VOCAB:
                continue
            if isinstance(mod, _INT) or (fmt == "fp8" and isinstance(mod, (Fp8Linear, Fp8Experts))):
                continue  # already in the format (an FP8 checkpoint loaded as FP8)
            params = [f"{name}.{n}" for n, p in mod.named_parameters() if id(p) not in seen]
            seen.update(id(p) for p in mod.parameters())
            if params:
                self.left[name] = set(params)
                self.owner.update(dict.fromkeys(params, name))
        # every (module, attribute) holding a deferred parameter: a tied head shares the table
        ids = {id(model.get_parameter(p)): p for p in self.owner}
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {p: [] for p in self.owner}
        for mod in model.modules():
            for leaf, p in mod._parameters.items():
                if p is not None and id(p) in ids:
                    self.slots[ids[id(p)]].append((mod, leaf))
        # parameter -> tensors still to be written into it (random weights: one draw each)
        self.pending: dict[str, int] = dict.fromkeys(self.owner, 1)
        self.live = self.peak = 0  # bytes of BF16 weights allocated and not yet quantized
        self.allocated = 0  # bytes of BF16 weights allocated in all
        self.hints: dict[str, object] = {}  # parameter -> its source's hint (_int_linear)
        self._parts: dict[str, int] = {}  # parameter -> per-expert hints heard (hint)
        self.expected: dict[str, int] = {}  # parameter -> tensors to be written into it
        self.take_hints = True  # False: --gguf-int4 requantize

    def wants_hint(self, name: str, formats=("int4",)) -> bool:
        """Whether this load makes int8 / int4 of parameter `name` and takes a source file's
        hints, given for the storage `formats` (a GGUF file's: int4; a compressed-tensors
        checkpoint's: both)."""
        # (not the vocabulary's: quantize_vocab_ makes them from their values; a GPTQ
        # lm_head=True checkpoint's head came out of unread memory when its codes were taken)
        return self.take_hints and self.fmt in formats and self.owner.get(name, VOCAB[0]) not in VOCAB

    def hint(self, name: str, hint, target=None) -> None:
        """What the source file says of parameter `name` (a GGUF tensor's int4 hint, a
        compressed-tensors weight's codes); heard before `written(name)`. Kept only where
        wants_hint. target (weights._Target): one expert's gate, up or down projection, whose
        hint goes into the [E, ...] hint of the parameter (used once every slice has one of the
        same kind, else dropped: the slices' values then make it)."""
        if name not in self.owner:
            return
        if hint is None:  # (an expert's slice without one: the [E, ...] hint cannot be whole)
            if target is not None and target.expert is not None:
                self._drop(name)
            return
        if target is None or target.expert is None:
            self.hints[name] = hint
            return
        p = self.slots[name][0][0]._parameters[self.slots[name][0][1]]  # [E, 2I, H] / [E, H, I]
        rows = p.shape[1] // 2 if target.part in ("gate", "up") else p.shape[1]
        at = rows if target.part == "up" else 0
        whole = self.hints.get(name)
        if whole is None and name not in self._parts:
            whole = self.hints[name] = type(hint)(*(
                None if t is None else torch.empty(p.shape[0], p.shape[1], *t.shape[1:],
                                                   dtype=t.dtype) for t in hint))  # fmt: skip
        fits = (type(whole) is type(hint) and all(
            (a is None) == (b is None) and (a is None or a.shape[2:] == b.shape[1:])
            for a, b in zip(whole, hint, strict=True))
            and all(t is None or t.shape[0] == rows for t in hint))
        if not fits:  # slices of different kinds: no hint for the parameter
            self._drop(name)
            return
        for a, b in zip(whole, hint, strict=True):
            if a is not None:
                a[target.expert, at : at + rows].copy_(b)
        self._parts[name] = self._parts.get(name, 0) + 1

    def skips_values(self, name: str, target=None, part=None) -> bool:
        """Whether parameter `name` is made from its hint's codes alone (takes_lattice): its
        values need not be read (a GGUF Q4_K tensor: no dequantizing to fp32 and finding its
        codes again). Whole (one tensor), or (target: weights._Target) one expert's slice of
        per-expert tensors whose slices so far all fitted the [E, ...] hint (a compressed-tensors
        / GPTQ / AWQ MoE: ~1 ms of dequantizing each of 35B-A3B's 30,720). A later slice that
        does not fit drops the hint: `lost` then says the skipped slices' values are wanted.
        part: the slice's own hint (FP8 asks it whether it is held exactly: the [E, ...] one is
        not filled yet; one that is not drops the parameter's hint as well)."""
        hint = self.hints.get(name)
        coded = (isinstance(hint, Lattice) and hint.codes is not None) or \
            isinstance(hint, Int8Rows)  # fmt: skip
        sliced = target is not None and target.expert is not None
        if not coded or (self.pending.get(name) != 1 and not sliced):
            return False
        mod, leaf = self.slots[name][0]
        if takes_lattice(mod, leaf, self.fmt, part if sliced else hint, self.block):
            return True
        if sliced and self.fmt == "fp8":  # (the values make it: every slice's are wanted)
            self._drop(name)
        return False

    def _drop(self, name: str) -> None:
        """No hint for parameter `name` (its slices' values make it): `lost` from now on."""
        self.hints.pop(name, None)
        self._parts[name] = -(1 << 30)

    def lost(self, name: str) -> bool:
        """Whether parameter `name`'s per-expert hint was dropped (slices of different kinds):
        its values, skipped or not, make it."""
        return self._parts.get(name, 0) < 0

    def deferred(self) -> set[int]:
        """ids of the (meta) parameters to leave unallocated."""
        return {id(m._parameters[leaf]) for slots in self.slots.values() for m, leaf in slots}

    def expect(self, counts: dict[str, int]) -> None:
        """How many tensors will be written into each deferred parameter."""
        self.pending = {p: counts.get(p, 0) for p in self.owner}
        self.expected = dict(self.pending)  # (per-expert hints: one a tensor written)
        missing = [p for p, n in self.pending.items() if n == 0]
        if missing:  # the scan reports missing tensors before this: an internal error
            raise RuntimeError(f"nothing to read into {missing[:3]}")

    def allocate(self, name: str) -> torch.Tensor:
        """Deferred parameter `name`, allocated in its module (the only reference kept: the
        module's replacement frees it)."""
        slots = self.slots[name]
        mod, leaf = slots[0]
        if not mod._parameters[leaf].is_meta:  # allocated by an earlier tensor
            return mod._parameters[leaf]
        q = self.alloc(mod._parameters[leaf])
        for mod, leaf in slots:
            mod._parameters[leaf] = q
        self.live += q.numel() * q.element_size()
        self.allocated += q.numel() * q.element_size()
        self.peak = max(self.peak, self.live)
        return q

    def written(self, name: str) -> None:
        if name not in self.owner:
            return
        self.pending[name] -= 1
        if self.pending[name]:
            return
        mod_name = self.owner[name]
        self.left[mod_name].discard(name)
        if not self.left[mod_name]:
            mod = self.model.get_submodule(mod_name)
            nbytes = sum(p.numel() * p.element_size() for p in mod.parameters())
            del mod
            for p in [p for p, m in self.owner.items() if m == mod_name]:
                del self.slots[p]  # (they hold the old module: it must go once replaced)
            if mod_name in VOCAB:
                quantize_vocab_(self.model, self.dtype, mod_name, self.fmt)
            else:
                hints = {}
                for p in [p for p in self.hints if self.owner[p] == mod_name]:
                    h = self.hints.pop(p)
                    if self._parts.pop(p, None) in (None, self.expected.get(p)):  # (all slices)
                        hints[p.removeprefix(mod_name + ".")] = _on(h, self.device)
                quantize_module_(self.model, mod_name, self.fmt, self.dtype, self.block, hints)
            self.live -= nbytes
            self.freed += nbytes
            if self.freed >= self.RELEASE_EVERY:
                heap.release()  # (small modules are freed into the C heap, not to the OS)
                self.freed = 0

    def finish(self) -> None:
        undone = [m for m, ps in self.left.items() if ps]
        if undone:
            raise RuntimeError(f"modules never completed while loading: {undone[:3]}")
