"""Quantized stand-ins for `Linear`, `Embedding` and MoE `Experts`.

Each subclasses the module it replaces, so packing, `isinstance` checks and the model's forward
need no changes; only the parameters and the matmul differ. Storage parameters carry
`keep_dtype = True`, which tells the loader's `materialize` not to cast them to the model dtype.

FP8 parameter names are the official checkpoints' (`weight` e4m3 + `weight_scale_inv`; fused
experts `gate_up_proj` + `gate_up_proj_scale_inv`), so the loader fills them by name. Scales
are kept in fp32 (what the kernels read; 2 extra bytes per 16,384 weights).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.layers.linear import Linear, linear, linear_many
from qwen35.layers.moe import Experts
from qwen35.quant import formats, matmul
from qwen35.quant.formats import FP8_DTYPE


def qparam(t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.keep_dtype = True  # loader.materialize: allocate in this dtype, not the model's
    return p


def nblocks(n: int, b: int) -> int:
    return -(-n // b)


class Fp8Linear(Linear):
    """weight [out, in] e4m3, weight_scale_inv [ceil(out/bo), ceil(in/bi)] fp32."""

    def __init__(self, in_features: int, out_features: int, block=(128, 128), device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.weight = qparam(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        nb = (nblocks(out_features, block[0]), nblocks(in_features, block[1]))
        self.weight_scale_inv = qparam(torch.empty(nb, dtype=torch.float32, device=device))

    @classmethod
    def from_blocks(cls, q: torch.Tensor, scale: torch.Tensor, block) -> Fp8Linear:
        """Weights already in e4m3 with their scales (formats.fp8_on_lattice)."""
        m = cls(q.shape[1], q.shape[0], block, device=q.device)
        m.weight.data, m.weight_scale_inv.data = q.contiguous(), scale.float().contiguous()
        return m

    @classmethod
    def quantize(cls, w: torch.Tensor, block=(128, 128)) -> Fp8Linear:
        m = cls(w.shape[1], w.shape[0], block, device=w.device)
        q, s = matmul.quantize_fp8(w, block)
        m.weight.data, m.weight_scale_inv.data = q, s.float()
        return m

    def dequantized(self, dtype) -> torch.Tensor:
        return formats.dequantize_fp8_blocks(self.weight, self.weight_scale_inv, dtype, self.block)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return matmul.fp8_linear(x, self.weight, self.weight_scale_inv, self.block)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, fp8 blocks {self.block}"


class Int8Linear(Linear):
    """weight [out, in] int8, weight_scale [out] in the compute dtype (symmetric per row)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        nn.Module.__init__(self)
        self.out_features, self.in_features = q.shape
        self.weight, self.weight_scale = qparam(q), qparam(scale)

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype) -> Int8Linear:
        return cls(*matmul.quantize_int8(w, dtype))

    def dequantized(self, dtype) -> torch.Tensor:
        return formats.dequantize_int8_rows(self.weight, self.weight_scale, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return matmul.int8_linear(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, int8"


class Int6Linear(Linear):
    """lm_head under int4: weight [out, in / 64 * 48] uint8, 6-bit codes in groups of 32 inputs,
    weight_scale [out, in / 32] bf16 (quant/formats.py quantize_int6_groups). 6.5 bits a weight
    where per-row int8 takes 8 (llama.cpp keeps its q4_0 models' output in q6_K alike)."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor):
        nn.Module.__init__(self)
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * formats.INT6_GROUP
        self.weight, self.weight_scale = qparam(packed), qparam(scales)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int6Linear:
        return cls(*matmul.quantize_int6(w))

    def dequantized(self, dtype) -> torch.Tensor:
        return formats.dequantize_int6(self.weight, self.weight_scale, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return matmul.int6_linear(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, int6 groups of {formats.INT6_GROUP}"


class Int4Linear(Linear):
    """weight [out, in/2] uint8 in torch's CPU int4 layout, scales_and_zeros [in/g, out, 2].

    x8: decode rows (up to 16) multiply with activations rounded to 8 bits per 32 inputs, as
    llama.cpp's q4_0 does (kernels/int4_cpu.cpp; faster); False keeps them at bf16 / rounds
    them to 16 bits (`--int4-activations 16bit`: set_int4_activations). A class setting: the
    kernels read it per call, the CPU decode plan when it is built."""

    x8 = True

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, group: int, out_features: int):
        nn.Module.__init__(self)
        self.out_features, self.in_features, self.group = out_features, packed.shape[1] * 2, group
        self.weight, self.scales_and_zeros = qparam(packed), qparam(sz)

    @classmethod
    def quantize(cls, w: torch.Tensor, group: int, dtype) -> Int4Linear:
        return cls(*matmul.quantize_int4(w, group, dtype), group, w.shape[0])

    @classmethod
    def on_lattice(cls, w: torch.Tensor | None, step: torch.Tensor, zero: torch.Tensor, dtype,
                   codes: torch.Tensor | None = None):  # fmt: skip
        """Groups on the given lattices (formats.int4_on_lattice: of in / step.shape[1] inputs):
        a GGUF file's or a compressed-tensors checkpoint's 4-bit values kept as they are, not
        quantized again (codes: its 4-bit codes; w then unused)."""
        q, sz = formats.int4_on_lattice(w, step, zero, dtype, codes)
        return cls(matmul.pack_int4(q), sz, q.shape[1] // step.shape[1], step.shape[0])

    def dequantized(self, dtype) -> torch.Tensor:
        q = matmul.unpack_int4(self.weight, self.out_features, self.in_features)
        return formats.dequantize_int4_groups(q, self.scales_and_zeros, self.group, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        sz = sz if sz.is_contiguous() else sz.contiguous()  # a row view of a packed group's
        return matmul.int4_linear(x, self.weight, sz, self.group, self.out_features, self.x8)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, int4 groups of {self.group}"


def set_int4_activations(model: nn.Module, x8: bool) -> None:
    """`--int4-activations int8` (x8) or `16bit` for every Int4Linear of this process
    (Int4Linear.x8); `model`'s CPU decode plans, which read it when built, are dropped to be
    built again."""
    Int4Linear.x8 = x8
    for name in ("_decode_plan", "_mtp_plan"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


class Int8Embedding(nn.Module):
    """Rows of an int8 [V, H] matrix with per-row scales (shared with an Int8Linear lm_head
    when the embeddings are tied): each looked-up row is dequantised."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.weight, self.weight_scale, self.dtype = head.weight, head.weight_scale, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        rows = F.embedding(ids, self.weight)  # [T, H] int8
        return rows.to(self.dtype) * self.weight_scale[ids][:, None].to(self.dtype)


class Int6Embedding(nn.Module):
    """Rows of an Int6Linear lm_head's matrix (tied embeddings under int4), dequantised as looked
    up."""

    def __init__(self, head: Int6Linear, dtype: torch.dtype):
        super().__init__()
        self.weight, self.weight_scale, self.dtype = head.weight, head.weight_scale, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        from qwen35.kernels import gemv

        flat = ids.reshape(-1)
        if self.weight.is_cpu and (mod := gemv.load_int6()) is not None:  # (a decode step's row:
            rows = mod.int6_rows(self.weight, self.weight_scale, flat, self.dtype)  # ~20 ops less)
        else:
            rows = formats.dequantize_int6(self.weight[flat], self.weight_scale[flat], self.dtype)
        return rows.view(*ids.shape, -1)


class Fp8Experts(Experts):
    """gate_up_proj [E, 2I, H] e4m3 with scales [E, 2 ceil(I/bo), ceil(H/bi)] (gate blocks, then
    up blocks: the per-expert checkpoint layout); down_proj [E, H, I] with [E, ceil(H/bo),
    ceil(I/bi)]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, block, device):
        nn.Module.__init__(self)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.intermediate_size, self.block = E, I, tuple(block)
        bo, bi = block
        self.gate_up_proj = qparam(torch.empty(E, 2 * I, H, dtype=FP8_DTYPE, device=device))
        self.gate_up_proj_scale_inv = qparam(
            torch.empty(E, 2 * nblocks(I, bo), nblocks(H, bi), device=device)
        )
        self.down_proj = qparam(torch.empty(E, H, I, dtype=FP8_DTYPE, device=device))
        self.down_proj_scale_inv = qparam(
            torch.empty(E, nblocks(H, bo), nblocks(I, bi), device=device)
        )

    @classmethod
    def from_blocks(cls, gate_up, down, block) -> Fp8Experts:
        """Experts already in e4m3 with their scales ((weights [E, ...], scales) pairs:
        formats.fp8_on_lattice of the [E, 2I, H] / [E, H, I] hints; blocks of one row)."""
        (gu, gus), (dn, dns) = gate_up, down
        E, twoI, H = gu.shape
        m = cls(E, H, twoI // 2, block, device=gu.device)
        m.gate_up_proj.data, m.gate_up_proj_scale_inv.data = gu.contiguous(), gus.contiguous()
        m.down_proj.data, m.down_proj_scale_inv.data = dn.contiguous(), dns.contiguous()
        return m

    @classmethod
    def quantize(cls, ex: Experts, block=(128, 128)) -> Fp8Experts:
        E, twoI, H = ex.gate_up_proj.shape
        I = twoI // 2
        m = cls(E, H, I, block, device=ex.gate_up_proj.device)
        for e in range(E):
            for half in (0, 1):
                q, s = matmul.quantize_fp8(ex.gate_up_proj[e, half * I : (half + 1) * I], block)
                nb = s.shape[0]
                m.gate_up_proj.data[e, half * I : (half + 1) * I] = q
                m.gate_up_proj_scale_inv.data[e, half * nb : (half + 1) * nb] = s.float()
            q, s = matmul.quantize_fp8(ex.down_proj[e], block)
            m.down_proj.data[e], m.down_proj_scale_inv.data[e] = q, s.float()
        return m

    def fused_weights(self):
        """As stored, for kernels/triton_moe.py (128 x 128 blocks, or blocks of one row and
        32, 64 or 128 inputs; every expert here)."""
        ok = self.block == (128, 128) or self.block[0] == 1 and \
            self.block[1] in formats.FP8_ROW_WIDTHS  # fmt: skip
        if not ok or self.num_total is not None:
            return None
        from qwen35.ops.moe import ExpertWeights

        return ExpertWeights(self.gate_up_proj, self.down_proj, self.gate_up_proj_scale_inv,
                             self.down_proj_scale_inv, *self.block)  # fmt: skip

    def few_token_graphs(self, backend) -> int:
        """On a GPU with Triton, steps of any size run without a host sync (the Triton MoE up to
        16 tokens, the grouped GEMM over the sorted pairs above: `forward`): no limit; else
        the Triton MoE's tokens, if it reads these experts (Experts.few_token_graphs)."""
        from qwen35.quant.fp8_gpu import _grouped_kernel

        ok = backend.device_type == "cuda" and self.fused_weights() is not None
        return 1 << 30 if ok and _grouped_kernel() is not None else super().few_token_graphs(backend)

    def forward(self, x, top_idx, top_w, backend=None) -> torch.Tensor:
        gpu = x.is_cuda or (backend is not None and backend.on_gpu_path(x))  # (or interpreted)
        w = self.fused_weights() if gpu else None
        if w is not None:  # every expert here, in blocks the grouped GEMM reads
            from qwen35.quant.fp8_gpu import fp8_experts_sorted

            y = fp8_experts_sorted(x, top_idx, top_w, w, backend)
            if y is not None:
                return y
        return super().forward(x, top_idx, top_w, backend)

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        I, (bo, _) = self.intermediate_size, self.block
        w, s = self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]
        if I % bo == 0:  # gate and up blocks tile [2I, H] evenly: one call
            return matmul.fp8_linear(x, w, s, self.block)
        nb = s.shape[0] // 2
        return torch.cat(
            [
                matmul.fp8_linear(x, w[:I], s[:nb].contiguous(), self.block),
                matmul.fp8_linear(x, w[I:], s[nb:].contiguous(), self.block),
            ],
            dim=-1,
        )

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return matmul.fp8_linear(h, self.down_proj[e], self.down_proj_scale_inv[e], self.block)

    def many(self, which: str, xs: list, experts: list) -> torch.Tensor | None:
        """The k products stacked [k rows, N] by one kernel call (quant/matmul.py
        `fp8_linear_many`, the same bits as gate_up / down give), or None."""
        if which == "gate_up":
            if self.intermediate_size % self.block[0]:  # gate_up() takes two calls: so do we
                return None
            w, s = self.gate_up_proj, self.gate_up_proj_scale_inv
        else:
            w, s = self.down_proj, self.down_proj_scale_inv
        return matmul.fp8_linear_many(xs, [w[e] for e in experts], [s[e] for e in experts],
                                      self.block)  # fmt: skip

    def dequantized(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) in dtype."""
        I, E = self.intermediate_size, self.num_experts
        gu, dn = [], []
        for e in range(E):
            s = self.gate_up_proj_scale_inv[e]
            nb = s.shape[0] // 2
            w = self.gate_up_proj[e]
            gu.append(
                torch.cat(
                    [
                        formats.dequantize_fp8_blocks(w[:I], s[:nb], dtype, self.block),
                        formats.dequantize_fp8_blocks(w[I:], s[nb:], dtype, self.block),
                    ]
                )
            )
            dn.append(
                formats.dequantize_fp8_blocks(
                    self.down_proj[e], self.down_proj_scale_inv[e], dtype, self.block
                )
            )
        return torch.stack(gu), torch.stack(dn)


class Bf16Experts(Experts):
    """Routed experts stored in bf16 in a model that computes in fp32 (`--quantization bf16`):
    the transformers-named fused tensors, one product per active expert through
    layers/linear.py `linear` (our GEMV kernel for decode rows, a widened GEMM above)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device=None):
        nn.Module.__init__(self)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.intermediate_size = E, I
        self.gate_up_proj = qparam(torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=device))
        self.down_proj = qparam(torch.empty(E, H, I, dtype=torch.bfloat16, device=device))

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return linear(x, self.gate_up_proj[e])

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return linear(h, self.down_proj[e])

    def many(self, which: str, xs: list, experts: list) -> torch.Tensor | None:
        """The k products stacked [k rows, N] by one `linear_bf16_many` call (the bits of one
        call each), or None."""
        w = self.gate_up_proj if which == "gate_up" else self.down_proj
        return linear_many(xs, [w[e] for e in experts])

    def dequantized(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj.to(dtype), self.down_proj.to(dtype)


class ProjStack(NamedTuple):
    """One projection of every expert as one tensor (the per-expert modules' parameters are views
    of it): what quant/int_gpu.py's MoE kernels read. int4: weight [E, N, K/2] uint8 in
    Int4Linear's layout, scales [E, K/g, N, 2] (scales_and_zeros); int8: weight [E, N, K],
    scales [E, N]."""

    kind: str  # "int4" | "int8"
    weight: torch.Tensor
    scales: torch.Tensor
    group: int  # int4's group (0 for int8)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, N, K) of the experts' weights."""
        E, N = self.weight.shape[:2]
        return E, N, self.scales.shape[1] * self.group if self.kind == "int4" else self.weight.shape[2]


class IntExperts(Experts):
    """Routed experts as one Int8Linear / Int4Linear per expert and projection."""

    def __init__(self, gate_up: list[Linear], down: list[Linear], intermediate_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.intermediate_size = len(gate_up), intermediate_size
        self.gate_up_q = nn.ModuleList(gate_up)
        self.down_q = nn.ModuleList(down)
        self._lists: dict[str, list] = {}  # many()'s copies of the two ModuleLists
        self.stack: tuple[ProjStack, ProjStack] | None = None  # (gate_up, down): stack_()

    def stack_(self) -> bool:
        """Each projection's weights of every expert moved into one [E, ...] tensor (no memory
        added once the per-expert tensors are freed: theirs become views), for the GPU's MoE
        kernels; False (nothing done) unless each projection is int4 in one group size or int8
        for every expert (a GGUF Q4_K_M's experts: int4 gate_up, int8 down)."""
        kinds = []
        for mods in (self.gate_up_q, self.down_q):
            if len({(type(m), getattr(m, "group", 0), m.weight.shape) for m in mods}) != 1 \
                    or type(mods[0]) not in (Int4Linear, Int8Linear):  # fmt: skip
                return False
            kinds.append(type(mods[0]))
        parts = []
        for mods, cls in zip((self.gate_up_q, self.down_q), kinds, strict=True):
            name = "scales_and_zeros" if cls is Int4Linear else "weight_scale"
            w = torch.stack([m.weight.detach() for m in mods])
            sc = torch.stack([getattr(m, name).detach() for m in mods])
            for e, m in enumerate(mods):
                m.weight = qparam(w[e])
                setattr(m, name, qparam(sc[e]))
            four = cls is Int4Linear
            parts.append(ProjStack("int4" if four else "int8", w, sc, mods[0].group if four else 0))
        self.stack = (parts[0], parts[1])
        return True

    def few_token_graphs(self, backend) -> int:
        """Where the experts are stacked on a GPU, steps of any size run int_gpu.py's MoE
        kernels (no host sync: capturable): no limit; else 0."""
        from qwen35.quant.int_gpu import _kernels

        ok = self.stack is not None and self.num_total is None and backend.device_type == "cuda"
        return 1 << 30 if ok and _kernels() is not None else 0

    def forward(self, x, top_idx, top_w, backend=None) -> torch.Tensor:
        gpu = x.is_cuda or (backend is not None and backend.on_gpu_path(x))  # (or interpreted)
        if self.stack is not None and gpu and self.num_total is None:
            from qwen35.quant.int_gpu import int_experts_gpu, int_experts_sorted

            y = int_experts_gpu(x, top_idx, top_w, self.stack, backend)  # (<= MOE_MAX_ROWS)
            if y is None:  # more: the grouped GEMM over the pairs sorted by expert
                y = int_experts_sorted(x, top_idx, top_w, self.stack, backend)
            if y is not None:
                return y
        return super().forward(x, top_idx, top_w, backend)

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.gate_up_q[e](x)

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return self.down_q[e](h)

    def many(self, which: str, xs: list, experts: list) -> torch.Tensor | None:
        """The k products stacked [k rows, N] by one kernel call (quant/matmul.py
        `int4_linear_many` / `int8_linear_many`, the same bits as one call each), or None."""
        mods = self._lists.get(which)  # the ModuleList as a list: indexing it costs ~2 us
        if mods is None:
            mods = self._lists[which] = list(self.gate_up_q if which == "gate_up" else self.down_q)
        layers = [mods[e] for e in experts]
        kinds = ((Int4Linear, matmul.int4_linear_many), (Int8Linear, matmul.int8_linear_many))
        for cls, fn in kinds:
            if all(type(m) is cls for m in layers):
                return fn(xs, layers)
        return None
