"""Pure decode steps on a CPU as a flat list of kernel calls: the CPU's counterpart of a CUDA
graph (engine/cuda_graphs.py), for the per-token Python that a batch-1 step is otherwise made of.

At batch-1 decode a 0.8B token is ~100 GEMVs that stream the weights at the memory bandwidth,
plus ~200 module calls, attribute lookups and dispatch checks around them (~1.2 ms of a 48 ms
bf16 token, ~5% of an int4 one; README: Model implementation). `DecodePlan` resolves, once per
model, every weight and kernel a decoder layer's decode step touches, then runs the same
kernels in the same order as the modules' forwards would: results are bitwise the module
path's (tests/test_cpu_decode.py).

It applies to a step when: the model is on one rank, fp32 or bf16 (its K/V caches may be bf16 /
fp16 under fp32), the batch's backend has the CPU kernels (`QWEN35_NO_KERNELS=1` is honoured at
any time), and the step is decode only with its rows in state-slot order (the engine's usual
batch-1 step). Anything else takes the module path. A MoE block's step is in the plan too
(`_moe`: a bf16 block's one kernel call, else the C++ routing, the active experts' kernel
calls resolved once, the shared expert as a dense FFN; int4 / int8 / FP8 / bf16-stored blocks
one call of a C++ object holding their experts between the routing and the weighted sum,
`_held_block`); blocks whose experts it cannot resolve, and steps of more than
layers/linear.py MANY_MAX_ROWS rows (those blocks: 16), run the module (layers/moe.py).
LoRA adapters served per request are added after the kernels of the projections they adapt
(`_with_lora`, layers/lora.py).
"""

from __future__ import annotations

from functools import partial

import torch

from qwen35 import kernels
from qwen35.engine.forward_batch import ForwardBatch, ModelCaches
from qwen35.kernels import attention, small_ops
from qwen35.layers.linear import (
    GEMV_MAX_ROWS,
    MANY_MAX_ROWS,
    PACKED_MAX_ROWS,
    Linear,
    gemv_kernel_for,
    gemv_max_rows,
    linear,
)
from qwen35.layers.lora import add_lora
from qwen35.ops import moe as ops_moe
from qwen35.ops.deltanet import gated_slot_runs, over_phases
from qwen35.quant.packing import QuantPack


def supported(model, caches: ModelCaches) -> bool:
    """A plan can run this model on these caches: one tensor-parallel rank, packed projections,
    fp32 / bf16 with fp32 or bf16 DeltaNet states, conv states of the model dtype and K/V caches the
    attention kernel takes under it (the model's; bf16 / fp16 under fp32: --kv-cache-dtype)."""
    dtype = model.dtype
    return (
        model.tp.size == 1
        and model.packed
        and dtype in (torch.float32, torch.bfloat16)
        and all(c.dtype == dtype for c in caches.conv)
        and all(attention.takes(dtype, c.dtype) for c in caches.key + caches.value)
        and all(r.dtype in (torch.float32, torch.bfloat16) for r in caches.recurrent)
    )


def _direct(fn):
    """An int8 / int4 / FP8 linear (quant/layers.py) as the kernel call quant/matmul.py makes for
    decode rows, without the module call and dispatch checks around it (~5-10 us a call, ~100
    calls a token); rows or dtypes the kernel does not take go through the module. Anything else:
    fn (a module's forward). fn may be a linear's `matmul` (a packed run of one, quant/packing.py)."""
    from qwen35.kernels import gemv

    if isinstance(getattr(fn, "__self__", None), Linear):
        fn = fn.__self__  # (without its LoRA adapters: the plan adds them, _with_lora)
    from qwen35.quant import matmul
    from qwen35.quant.layers import Fp8Linear, Int4Linear, Int8Linear

    if type(fn) is Int8Linear and fn.weight_scale.is_contiguous():
        mod, q, scale = gemv.load(), fn.weight, fn.weight_scale
        if mod is not None:
            return lambda x: (
                mod.linear_int8(x.contiguous(), q, scale)
                if x.shape[0] <= matmul.INT8_MAX_ROWS and scale.dtype == x.dtype
                else fn(x)
            )
    if type(fn) is Int4Linear:
        mod, w, n, group = gemv.load_int4(), fn.weight, fn.out_features, fn.group
        sz = fn.scales_and_zeros.contiguous()  # as the module passes it
        x8 = matmul.int4_x8(fn.x8, group)
        if mod is not None:
            bf16_ours = matmul.int4_rows_ours(mod, torch.bfloat16, x8)
            return lambda x: (
                mod.linear_int4(x.contiguous(), w, sz, group, n, False, x8)  # (positional: faster)
                if x.shape[0] <= matmul.INT4_MAX_ROWS
                and sz.dtype == x.dtype
                and (x.dtype == torch.float32 or (bf16_ours and x.dtype == torch.bfloat16))
                else fn(x)
            )
    if type(fn) is Fp8Linear and fn.weight_scale_inv.is_contiguous():
        w, scale, (bo, bi) = fn.weight, fn.weight_scale_inv, fn.block
        got = matmul.fp8_kernel_for(torch.zeros(1, 1, dtype=torch.bfloat16), fn.block)
        if got is not None:
            mod, cvt = got  # as matmul.fp8_linear picks for bf16 decode rows
            return lambda x: (
                mod.linear_fp8(x.contiguous(), w, scale, bo, bi, cvt)
                if x.shape[0] <= gemv.MAX_ROWS and x.dtype == torch.bfloat16
                else fn(x)
            )
        from qwen35.kernels import fp8 as fp8_kernel

        if (avx2 := fp8_kernel.load()) is not None:  # CPUs without AVX512: fp8_cpu.cpp, as
            return lambda x: (  # matmul.fp8_linear calls it for decode rows
                avx2.fp8_linear(x.contiguous(), w, scale, bo, bi)
                if x.shape[0] <= fp8_kernel.MAX_ROWS and x.dtype in (torch.bfloat16, torch.float32)
                else fn(x)
            )
    if type(fn) is Linear:
        return _plain(fn.weight)
    if isinstance(fn, Linear):
        return fn.matmul  # without the module call
    return getattr(fn, "forward", fn)  # a module's forward without the module call


def _with_lora(fn, *linears):
    """fn (the kernel calls of these linears' products, one output or a tuple of them) plus
    the step's LoRA deltas of those linears that carry adapters (layers/lora.py); fn itself
    when none does (attaching or dropping an adapter drops the plan)."""
    if all(lin.lora is None for lin in linears):
        return fn
    if len(linears) == 1:
        def one(x):
            y = fn(x)
            add_lora(x, (y,), linears)
            return y

        return one

    def many(x):
        outs = fn(x)
        add_lora(x, outs, linears)
        return outs

    return many


def _plain(w: torch.Tensor):
    """x -> layers/linear.py linear(x, w) for a plain fp32 / bf16 weight, with the GEMV kernel
    it takes for decode rows resolved once: `linear` looks it up per call (gemv_kernel_for's
    checks, the kernel switch's environment read: ~3-5 us, ~100 calls a token). Rows it would
    not give the kernel go through `linear`."""
    from qwen35.kernels import gemv

    mod = gemv.load()
    if mod is None or not w.is_cpu or not w.is_contiguous():
        return lambda x: linear(x, w)
    kernel = mod.linear_fp32 if w.dtype == torch.float32 else mod.linear_bf16
    probe = lambda dt: torch.zeros(1, 1, dtype=dt)  # noqa: E731 - a decode row of dtype dt
    rows = {dt: gemv_max_rows(probe(dt), w) for dt in (torch.float32, torch.bfloat16)
            if gemv_kernel_for(probe(dt), w)}  # fmt: skip
    return lambda x: (
        kernel(x.contiguous(), w)
        if x.dtype in rows and x.dim() == 2 and x.shape[0] <= rows[x.dtype]
        else linear(x, w)
    )


def _projection(packed, *linears):
    """x -> the linears' outputs through their packed weight (layers/linear.py packed_linear),
    LoRA deltas added."""
    if not isinstance(packed, torch.Tensor):  # quantized: a QuantPack, one call for the outputs
        if len(packed.runs) == 1:  # one format: its call, split (without QuantPack's loop)
            (fn, sizes), = packed.runs
            fn = _direct(fn)
            one = (lambda x: (fn(x),)) if len(sizes) == 1 else \
                (lambda x: fn(x).split_with_sizes(sizes, dim=-1))  # fmt: skip
            return _with_lora(one, *linears)
        return _with_lora(QuantPack([(_direct(fn), sizes) for fn, sizes in packed.runs]),
                          *linears)  # fmt: skip
    sizes, fn = [lin.out_features for lin in linears], _plain(packed)
    # (Tensor.split's Python wrapper off)
    return _with_lora(lambda x: fn(x).split_with_sizes(sizes, dim=-1), *linears)


def _experts_many(ex, dtype):
    """A MoE layer's experts as ops/moe.py `few_token_experts`' many(which, xs, experts) on
    operands resolved once: the kernel call their module makes for few tokens (bf16 experts,
    also bf16-stored ones under fp32 rows: `linear_bf16_many`; int8 / int4 / FP8:
    `linear_int8_many` / `linear_int4_many` / `linear_fp8_many`), without its per-call lookups
    and checks; None where a projection's
    module would not take one of these kernels for rows of `dtype` (the module runs then)."""
    from qwen35.layers.moe import Experts
    from qwen35.quant import matmul
    from qwen35.quant.layers import Bf16Experts, Fp8Experts, Int4Linear, Int8Linear, IntExperts

    probe = torch.zeros(1, 1, dtype=dtype)  # a decode row of the model's dtype

    def plain(ws):  # bf16 experts [E, N, K] (layers/linear.py linear_many), bf16 or fp32 rows
        mod = gemv_kernel_for(probe, ws)
        if mod is None or ws.dtype != torch.bfloat16 or not ws.is_contiguous():
            return None
        w = list(ws.unbind(0))
        return lambda xs, es: mod.linear_bf16_many(xs, [w[e] for e in es])

    def quantized(layers):  # quant/matmul.py int8_linear_many / int4_linear_many
        if all(type(m) is Int4Linear for m in layers):
            sz = [m.scales_and_zeros.contiguous() for m in layers]
            x8 = matmul.int4_x8(layers[0].x8, layers[0].group)
            mod = matmul.int4_kernel_for(probe, sz[0], x8)
            if mod is None:
                return None
            w, g, n = [m.weight for m in layers], layers[0].group, layers[0].out_features
            return lambda xs, es: mod.linear_int4_many(xs, [w[e] for e in es],
                                                        [sz[e] for e in es], g, n, x8=x8)  # fmt: skip
        if all(type(m) is Int8Linear for m in layers):
            scales = [m.weight_scale for m in layers]
            mod = matmul.int8_kernel_for(probe, scales[0])
            if mod is None or not all(s.dtype == dtype and s.is_contiguous() for s in scales):
                return None
            q = [m.weight for m in layers]
            return lambda xs, es: mod.linear_int8_many(xs, [q[e] for e in es],
                                                        [scales[e] for e in es])  # fmt: skip
        return None

    def fp8(ws, scales, block):  # quant/matmul.py fp8_linear_many
        got = matmul.fp8_kernel_for(probe, block)
        if got is None:
            return None
        (mod, cvt), w, s, (bo, bi) = got, list(ws.unbind(0)), list(scales.unbind(0)), block
        return lambda xs, es: mod.linear_fp8_many(xs, [w[e] for e in es], [s[e] for e in es],
                                                  bo, bi, cvt)  # fmt: skip

    if (type(ex) is Experts and ex.grouped) or (type(ex) is Bf16Experts and ex.num_total is None):
        fns = plain(ex.gate_up_proj), plain(ex.down_proj)
    elif type(ex) is IntExperts and ex.num_total is None:
        fns = quantized(list(ex.gate_up_q)), quantized(list(ex.down_q))
    elif type(ex) is Fp8Experts and ex.num_total is None and not ex.intermediate_size % ex.block[0]:
        fns = (fp8(ex.gate_up_proj, ex.gate_up_proj_scale_inv, ex.block),
               fp8(ex.down_proj, ex.down_proj_scale_inv, ex.block))  # fmt: skip
    else:
        return None
    if None in fns:
        return None
    gate_up, down = fns
    return lambda which, xs, es: (gate_up if which == "gate_up" else down)(xs, es)


def _held_block(mlp, dtype):
    """A MoE block's decode step with its experts held by one C++ object (int4_cpu.cpp
    `Int4Moe`, gemv_cpu.cpp `Int8Moe` / `Bf16Moe`, fp8_cpu.cpp `Fp8Moe`; kernels/moe_block.h):
    x -> gemv_cpu.cpp `moe_route`, one `run` (the routed and shared experts' products and
    SwiGLUs), `moe_combine`, then the shared expert's gate as `_moe` applies it: 3 kernel calls
    and 3 small ops where few_token_moe + the shared expert make ~10 calls with their Python
    between (the same kernels on the same operands: the same bits), for steps of up to 16 rows
    (the module above; `_moe`'s other blocks: MANY_MAX_ROWS). None unless the experts and the
    shared expert's packed gate_up and down are all int4 / int8 / FP8, or bf16-stored under fp32
    rows, in a form the object takes for `dtype` rows (`_int4_held`, `_int8_held`, `_fp8_held`,
    `_bf16_held`), the router a plain weight moe_route takes, and no adapter on the router or
    shared expert."""
    from qwen35.kernels import fp8 as fp8_kernel
    from qwen35.kernels import gemv
    from qwen35.layers.moe import Experts
    from qwen35.quant import matmul
    from qwen35.quant.layers import Bf16Experts, Fp8Experts, Int4Linear, IntExperts

    ex, sh, g = mlp.experts, mlp.shared_expert, gemv.load()
    pack, sh_down, router = sh.packed_gate_up, sh.down_proj, mlp.gate.weight
    if isinstance(pack, QuantPack):  # quantized: one packed linear
        sh_gate_up = pack.runs[0][0] if len(pack.runs) == 1 else None
    else:  # plain: the packed weight
        sh_gate_up = pack if type(sh_down) is Linear else None
    if (g is None or sh_gate_up is None or ex.num_total is not None
            or type(mlp.gate) is not Linear or not router.is_contiguous()
            or router.dtype not in (dtype, torch.bfloat16)
            or any(lin.lora is not None for lin in (mlp.gate, mlp.shared_expert_gate,
                                                    sh.gate_proj, sh.up_proj, sh_down))):  # fmt: skip
        return None
    if type(ex) in (Experts, Bf16Experts) and isinstance(sh_gate_up, torch.Tensor):
        held = _bf16_held
    elif type(ex) is Fp8Experts:
        held = _fp8_held
    elif type(ex) is IntExperts:
        held = _int4_held if type(sh_down) is Int4Linear else _int8_held
    else:
        return None
    try:
        block = held(ex, sh_gate_up, sh_down, dtype)
    except RuntimeError:  # a layout the object's own checks refuse: the other paths run the block
        return None
    if block is None:
        return None
    rows = min(ops_moe.FEW_TOKENS, matmul.INT4_MAX_ROWS, matmul.INT8_MAX_ROWS, fp8_kernel.MAX_ROWS,
               GEMV_MAX_ROWS[torch.float32])  # fmt: skip
    route, combine, k = g.moe_route, g.moe_combine, mlp.top_k
    sh_gate = _plain(mlp.shared_expert_gate.weight)

    def run(x, backend):
        if x.shape[0] > rows or x.dtype != dtype:
            return mlp.forward(x, backend)
        x = x.contiguous()
        xs, es, ns, w, token = route(x, router, k)
        ys, shared = block.run(xs, es, ns, x)
        return combine(ys, w, token, x.shape[0]) + torch.sigmoid(sh_gate(x)) * shared

    return run


def _bf16_held(ex, sh_gate_up, sh_down, dtype):
    """_held_block's Bf16Moe, or None: rows other than fp32 (bf16 rows take moe_bf16's one call,
    `SparseMoE.cpu_step`), weights other than contiguous bf16, the shared expert's in another
    dtype."""
    from qwen35.kernels import gemv

    ws = (ex.gate_up_proj, ex.down_proj, sh_gate_up, sh_down.weight)
    if dtype != torch.float32 or any(w.dtype != torch.bfloat16 or not w.is_contiguous()
                                     for w in ws):  # fmt: skip
        return None
    return gemv.load().Bf16Moe(list(ex.gate_up_proj.unbind(0)), list(ex.down_proj.unbind(0)),
                               sh_gate_up, sh_down.weight)  # fmt: skip


def _int8_held(ex, sh_gate_up, sh_down, dtype):
    """_held_block's Int8Moe, or None: other layers than Int8Linear, scales that are not
    contiguous in the rows' dtype (the module's int8 kernel takes them only so)."""
    from qwen35.kernels import gemv
    from qwen35.quant import matmul
    from qwen35.quant.layers import Int8Linear

    layers, probe = [*ex.gate_up_q, *ex.down_q, sh_gate_up, sh_down], torch.zeros(1, 1, dtype=dtype)
    if any(type(m) is not Int8Linear or matmul.int8_kernel_for(probe, m.weight_scale) is None
           for m in layers):  # fmt: skip
        return None
    held = lambda ms: ([m.weight for m in ms], [m.weight_scale for m in ms])  # noqa: E731
    return gemv.load().Int8Moe(*held(ex.gate_up_q), *held(ex.down_q), sh_gate_up.weight,
                               sh_gate_up.weight_scale, sh_down.weight, sh_down.weight_scale)


def _fp8_held(ex, sh_gate_up, sh_down, dtype):
    """_held_block's Fp8Moe, or None: the shared expert not Fp8Linear of the experts' block,
    gate and up not one product (I % bo), bf16 rows that gemv_cpu.cpp's linear_fp8 takes
    (AVX512 CPUs: `_moe`'s per-call path with it), no fp8_cpu.cpp module, other rows."""
    from qwen35.kernels import fp8 as fp8_kernel
    from qwen35.quant import matmul
    from qwen35.quant.layers import Fp8Linear

    mod, block = fp8_kernel.load(), ex.block
    shared = (sh_gate_up, sh_down)
    if (mod is None or dtype not in (torch.float32, torch.bfloat16)
            or ex.intermediate_size % block[0]
            or any(type(m) is not Fp8Linear or tuple(m.block) != block for m in shared)
            or matmul.fp8_kernel_for(torch.zeros(1, 1, dtype=dtype), block) is not None):  # fmt: skip
        return None
    return mod.Fp8Moe(list(ex.gate_up_proj.unbind(0)), list(ex.gate_up_proj_scale_inv.unbind(0)),
                      list(ex.down_proj.unbind(0)), list(ex.down_proj_scale_inv.unbind(0)),
                      sh_gate_up.weight, sh_gate_up.weight_scale_inv, sh_down.weight,
                      sh_down.weight_scale_inv, *block)  # fmt: skip


def _int4_held(ex, sh_gate_up, sh_down, dtype):
    """_held_block's Int4Moe, or None: other layers than Int4Linear, scales of another dtype
    than the rows, groups or x8 that differ, rows our kernel does not take (torch's int4 kernel
    then: the module)."""
    from qwen35.kernels import gemv
    from qwen35.quant import matmul
    from qwen35.quant.layers import Int4Linear

    experts = [*ex.gate_up_q, *ex.down_q]
    layers = [*experts, sh_gate_up, sh_down]
    if any(type(m) is not Int4Linear for m in layers):
        return None
    x8 = matmul.int4_x8(layers[0].x8, layers[0].group)
    g4, probe = gemv.load_int4(), torch.zeros(1, 1, dtype=dtype)
    if (g4 is None or any(m.scales_and_zeros.dtype != dtype for m in layers)
            or any(m.group != experts[0].group for m in experts)
            or any(matmul.int4_x8(m.x8, m.group) != x8 for m in layers)
            or matmul.int4_kernel_for(probe, layers[0].scales_and_zeros, x8) is None):  # fmt: skip
        return None

    def held(ms):
        return [m.weight for m in ms], [m.scales_and_zeros.contiguous() for m in ms]

    (sgu, sgu_sz), (sdn, sdn_sz) = ((m.weight, m.scales_and_zeros.contiguous())
                                    for m in (sh_gate_up, sh_down))  # fmt: skip
    return g4.Int4Moe(*held(ex.gate_up_q), *held(ex.down_q), sgu, sgu_sz, sdn, sdn_sz,
                      experts[0].group, sh_gate_up.group, sh_down.group, x8)  # fmt: skip


def _moe(mlp, dtype):
    """A MoE block's decode step (layers/moe.py SparseMoE.forward for few rows, the same ops on
    the same operands): bf16 blocks the one-call kernel takes, its call (`SparseMoE.cpu_step`);
    blocks `_held_block` takes, its object's call; else `few_token_moe` on `_experts_many` (the
    module's routing and `few_token_experts` with an adapter on the router), the shared expert
    as a dense layer's FFN, then its gate; or the module's forward where the experts' kernels
    are not resolved. More rows than the path takes
    (MANY_MAX_ROWS; the one-call paths: 16) take the module too."""
    if dtype == torch.bfloat16 and (step := mlp.cpu_step()) is not None:
        return lambda x, backend: (  # (up to FEW_TOKENS rows, as the module calls it)
            step(x) if ops_moe.cpu_moe_takes(x) else mlp.forward(x, backend)
        )  # fmt: skip
    if (run := _held_block(mlp, dtype)) is not None:
        return run
    many = _experts_many(mlp.experts, dtype)
    if many is None:
        return mlp.forward
    sh, k = mlp.shared_expert, mlp.top_k
    sh_gate_up = _projection(sh.packed_gate_up, sh.gate_proj, sh.up_proj)
    sh_down = _with_lora(_direct(sh.down_proj), sh.down_proj)
    sh_gate = _with_lora(_plain(mlp.shared_expert_gate.weight), mlp.shared_expert_gate)

    router = mlp.gate.weight if mlp.gate.lora is None else None  # (as SparseMoE.cpu_routed)

    def run(x, backend):
        if x.shape[0] > min(ops_moe.FEW_TOKENS, MANY_MAX_ROWS):
            return mlp.forward(x, backend)  # (`many` takes an expert's rows up to that)
        routed = None if router is None else ops_moe.few_token_moe(x, router, k, None, None, many)
        if routed is None:
            top_w, top_idx = mlp.route(x)
            routed = ops_moe.few_token_experts(x, top_idx, top_w, None, None, many)
        gate, up = sh_gate_up(x)
        shared = torch.sigmoid(sh_gate(x)) * sh_down(small_ops.load().silu_mul(gate, up))
        return routed + shared

    return run


# The mixers between their projections: ops/deltanet.py's and ops/attention.py's fused entries
# on resolved operands and the layer's cache index (the leading arguments), then the projection
# outputs and the step's (DeltaNet module, attention module, batch, caches, cos, sin).
def _deltanet(conv_w, dt_bias, a_log, norm_w, eps, nk, i, proj, step):
    qkv, z, b, a = proj
    dn, _, batch, caches, _, _ = step
    d, conv, rec = batch.decode, caches.conv[i], caches.recurrent[i]
    if d.phases is None:
        return gated_slot_runs(dn, qkv, z, a, b, conv_w, dt_bias, a_log, norm_w, eps, nk,
                               d.slot_runs, conv, rec)  # fmt: skip
    def step(p):  # a speculative verify step: the draft rows after the others
        r = slice(*p.row_range)
        return gated_slot_runs(dn, qkv[r], z[r], a[r], b[r], conv_w, dt_bias, a_log, norm_w, eps,
                               nk, p.slot_runs, conv, rec)  # fmt: skip

    return torch.cat(over_phases(d, conv, rec, step))


def _attention(q_norm_w, k_norm_w, eps, scale, i, proj, step):
    qg, k, v = proj
    _, attn, batch, caches, cos, sin = step
    d = batch.decode
    return attn.attention_decode_gated(
        qg, k, v, q_norm_w, k_norm_w, eps, cos, sin, caches.key[i], caches.value[i],
        batch.slot_mapping, d.block_tables, d.context_lens, scale,
    )  # fmt: skip


class DecodePlan:
    """Every layer's decode-step operands, resolved once for a model (its weights: build a new
    plan after they move, Qwen35ForCausalLM.post_load drops it)."""

    def __init__(self, model, layers=None):
        """layers: these decoder layers (default: the model's; the MTP head's own layer)."""
        layers = model.model.layers if layers is None else layers
        self.has_deltanet = any(layer.layer_type == "linear_attention" for layer in layers)
        self.layers = []
        for layer in layers:
            i, mlp = layer.cache_index, layer.mlp
            if layer.is_moe:  # the block's decode step, or its module (layers/moe.py)
                ffn = (_moe(mlp, model.dtype), None)
            else:  # gate_up, then down of silu * up
                ffn = (_projection(mlp.packed_gate_up, mlp.gate_proj, mlp.up_proj),
                       _with_lora(_direct(mlp.down_proj), mlp.down_proj))  # fmt: skip
            common = (
                layer.input_layernorm.weight,
                layer.input_layernorm.eps,
                layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.eps,
                *ffn,
            )
            if layer.layer_type == "linear_attention":
                m = layer.linear_attn
                mixer = (
                    _projection(m.packed_in, *m.in_projs()),
                    _with_lora(_direct(m.out_proj), m.out_proj),
                    partial(_deltanet, m.conv1d.weight[:, 0, :], m.dt_bias, m.A_log,
                            m.norm.weight, m.norm.eps, m.dims.nk, i),  # fmt: skip
                )
            else:
                m = layer.self_attn
                mixer = (
                    _projection(m.packed_qkv, m.q_proj, m.k_proj, m.v_proj),
                    _with_lora(_direct(m.o_proj), m.o_proj),
                    partial(_attention, m.q_norm.weight, m.k_norm.weight, m.q_norm.eps,
                            m.scale, i),  # fmt: skip
                )
            self.layers.append(common + mixer)

    @staticmethod
    def applies(batch: ForwardBatch) -> bool:
        be, d = batch.backend, batch.decode
        return (
            not batch.prefill
            and d is not None
            and batch.num_tokens <= PACKED_MAX_ROWS  # the modules' projections are packed too
            and (
                d.all_rows_in_slot_order and d.rows_by_slot is not None
                if d.phases is None
                else all(p.in_slot_order for p in d.phases)
            )
            and batch.mm_rows is None
            and be is not None
            and be.cpu_kernels is not None
            and be.cpu_attention is not None
            and be.cpu_small_ops is not None
            and not kernels.switched_off()
        )

    def run(self, h: torch.Tensor, cos, sin, batch: ForwardBatch, caches: ModelCaches):
        """The decoder layers on the residual stream h [T, H] (updated in place), as
        Qwen35ForCausalLM.forward_hidden's loop: returns the last layer's output, not yet
        added to h."""
        d = batch.decode
        if d.fresh_slots is not None and self.has_deltanet:  # new sequences: zero states
            for conv, rec in zip(caches.conv, caches.recurrent, strict=True):
                conv.index_fill_(0, d.fresh_slots, 0)
                rec.index_fill_(0, d.fresh_slots, 0)
        so = small_ops.load()
        step = (kernels.load(), attention.load(), batch, caches, cos.contiguous(), sin.contiguous())
        delta = None
        for w_in, eps_in, w_post, eps_post, gate_up, down, proj, out, mixer in self.layers:
            if delta is None:
                x = so.rms_norm_zc(h, w_in, eps_in)
            else:
                x = so.add_rms_norm_zc_(h, delta, w_in, eps_in)
            y = mixer(proj(x), step)
            x = so.add_rms_norm_zc_(h, out(y), w_post, eps_post)
            if down is None:  # MoE: gate_up is its step (_moe)
                delta = gate_up(x, batch.backend)
            else:
                gate, up = gate_up(x)
                delta = down(so.silu_mul(gate, up))
        return delta
