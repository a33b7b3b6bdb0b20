"""Pure decode steps on a CPU as a flat list of kernel calls: the CPU's counterpart of a CUDA
graph (engine/cuda_graphs.py), for the per-token Python that a batch-1 step is otherwise made of.

At batch-1 decode a 0.8B token is ~100 GEMVs that stream the weights at the memory bandwidth,
plus ~200 module calls, attribute lookups and dispatch checks around them (~1.2 ms of a 48 ms
bf16 token, ~5% of an int4 one; README: Model implementation). `DecodePlan` resolves, once per
model, every weight and kernel a decoder layer's decode step touches, then runs the same
kernels in the same order as the modules' forwards would: results are bitwise the module
path's (tests/test_cpu_decode.py).

It applies to a step when: the model is on one rank, fp32 or bf16, the batch's backend has
the CPU kernels (`QWEN35_NO_KERNELS=1` is honoured at any time), and the step is decode only
with its rows in state-slot order (the engine's usual batch-1 step). Anything else takes the
module path. MoE layers run their routing and experts through their module (layers/moe.py);
their mixers and norms are in the plan like a dense layer's.
"""

from __future__ import annotations

from functools import partial

import torch

from qwen35 import kernels
from qwen35.engine.forward_batch import ForwardBatch, ModelCaches
from qwen35.kernels import attention, small_ops
from qwen35.layers.linear import PACKED_MAX_ROWS, linear
from qwen35.ops.deltanet import gated_slot_runs
from qwen35.quant.packing import QuantPack


def supported(model, caches: ModelCaches) -> bool:
    """A plan can run this model on these caches: one tensor-parallel rank, packed projections,
    fp32 / bf16 with fp32 DeltaNet states and K/V caches of the model dtype."""
    dtype = model.dtype
    return (
        model.tp.size == 1
        and model.packed
        and dtype in (torch.float32, torch.bfloat16)
        and all(c.dtype == dtype for c in caches.key + caches.value + caches.conv)
        and all(r.dtype == torch.float32 for r in caches.recurrent)
    )


def _direct(fn):
    """An int8 / int4 / FP8 linear (quant/layers.py) as the kernel call quant/matmul.py makes for
    decode rows, without the module call and dispatch checks around it (~5-10 us a call, ~100
    calls a token); rows or dtypes the kernel does not take go through the module. Anything else:
    fn (a module's forward)."""
    from qwen35.kernels import gemv
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
        if mod is not None:
            fast = mod.int4_fast_supported()
            return lambda x: (
                mod.linear_int4(x.contiguous(), w, sz, group, n)
                if x.shape[0] <= matmul.INT4_MAX_ROWS
                and sz.dtype == x.dtype
                and (x.dtype == torch.float32 or (fast and x.dtype == torch.bfloat16))
                else fn(x)
            )
    if type(fn) is Fp8Linear and fn.weight_scale_inv.is_contiguous():
        mod, w, scale, (bo, bi) = gemv.load(), fn.weight, fn.weight_scale_inv, fn.block
        if mod is not None and (mod.fp8_supported(bi) or mod.fp8_cvt_supported()):
            cvt = not mod.fp8_supported(bi)  # as matmul.fp8_linear picks
            return lambda x: (
                mod.linear_fp8(x.contiguous(), w, scale, bo, bi, cvt)
                if x.shape[0] <= gemv.MAX_ROWS and x.dtype == torch.bfloat16
                else fn(x)
            )
    return getattr(fn, "forward", fn)  # a module's forward without the module call


def _projection(packed, *linears):
    """x -> the linears' outputs through their packed weight (layers/linear.py packed_linear)."""
    if not isinstance(packed, torch.Tensor):  # quantized: a QuantPack, one call for the outputs
        return QuantPack([(_direct(fn), sizes) for fn, sizes in packed.runs])
    sizes = [lin.out_features for lin in linears]
    return lambda x: linear(x, packed).split(sizes, dim=-1)


# The mixers between their projections: ops/deltanet.py's and ops/attention.py's fused entries
# on resolved operands and the layer's cache index (the leading arguments), then the projection
# outputs and the step's (DeltaNet module, attention module, batch, caches, cos, sin).
def _deltanet(conv_w, dt_bias, a_log, norm_w, eps, nk, i, proj, step):
    qkv, z, b, a = proj
    dn, _, batch, caches, _, _ = step
    return gated_slot_runs(dn, qkv, z, a, b, conv_w, dt_bias, a_log, norm_w, eps, nk,
                           batch.decode.slot_runs, caches.conv[i], caches.recurrent[i])  # fmt: skip


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

    def __init__(self, model):
        self.layers = []
        for layer in model.model.layers:
            i, mlp = layer.cache_index, layer.mlp
            if layer.is_moe:  # the module's routing and experts (layers/moe.py)
                ffn = (mlp.forward, None)
            else:  # gate_up, then down of silu * up
                ffn = (_projection(mlp.packed_gate_up, mlp.gate_proj, mlp.up_proj),
                       _direct(mlp.down_proj))  # fmt: skip
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
                    _direct(m.out_proj),
                    partial(_deltanet, m.conv1d.weight[:, 0, :], m.dt_bias, m.A_log,
                            m.norm.weight, m.norm.eps, m.dims.nk, i),  # fmt: skip
                )
            else:
                m = layer.self_attn
                mixer = (
                    _projection(m.packed_qkv, m.q_proj, m.k_proj, m.v_proj),
                    _direct(m.o_proj),
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
            and d.rows_by_slot is not None
            and d.all_rows_in_slot_order
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
        if d.fresh_slots is not None:  # new sequences start from zero states
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
            if down is None:  # MoE: gate_up is the module's forward
                delta = gate_up(x, batch.backend)
            else:
                gate, up = gate_up(x)
                delta = down(so.silu_mul(gate, up))
        return delta
