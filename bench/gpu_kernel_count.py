"""GPU kernels per decode token, counted on a CPU: the cuda backend's decode forward (what a CUDA
graph captures) run through Triton's interpreter, every launch counted.

A captured decode step still pays about 1-3 us of GPU time per kernel (launch inside the graph,
the tail of each small grid); at the 0.8B's 2.5 ms/token goal a thousand kernels is most of it.
The count depends on the layer structure, not on the sizes, so the model here is the catalog
model's layer list (count, full / linear attention pattern, dense or MoE, tied head) with tiny
dimensions. Counted per forward: every Triton kernel launch (ours and fla-core's) and every ATen
op that launches a kernel (views, `empty` and metadata ops launch none; torch's matmuls count
one each, though cuBLAS may split one into two). Host reads are listed apart: a capturable step
has none.

Needs Triton installed and TRITON_INTERPRET=1 (tests/triton_interp.py has the venv recipe):

    TRITON_INTERPRET=1 PYTHONPATH=src:tests /work/venvs/gpu/bin/python bench/gpu_kernel_count.py \\
        --model Qwen3.5-0.8B --batch 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {  # ATen ops that allocate or describe, but launch nothing
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::result_type",
}  # fmt: skip
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
              "aten::nonzero", "aten::bincount", "aten::lift_fresh"}  # fmt: skip


class KernelCount(TorchDispatchMode):
    """ATen ops that would launch a GPU kernel, plus Triton launches (patched in `counting`)."""

    def __init__(self):
        super().__init__()
        self.aten: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self.inside_triton = 0  # the interpreter's own tensor copies are not kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton:
            name = func._schema.name
            if name in HOST_READS:
                self.host_reads[name] += 1
            rets = func._schema.returns
            is_view = bool(rets) and rets[0].alias_info is not None and not func._schema.is_mutable
            if not is_view and name not in NO_KERNEL and name not in HOST_READS:
                self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


def counting(mode: KernelCount):
    """Patch the interpreter's launch so each kernel launch counts once, by kernel name."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode.triton[getattr(self.fn, "__name__", "triton")] += 1
        mode.inside_triton += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside_triton -= 1

    InterpretedFunction.run = counted_run
    return lambda: setattr(InterpretedFunction, "run", run)


def tiny_like(name: str):
    """The catalog model's layer structure with tiny sizes (counts do not depend on sizes)."""
    from qwen35.catalog import load_model_config

    cfg = load_model_config(name)
    moe = cfg.is_moe
    return dataclasses.replace(
        cfg,
        vocab_size=512,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4 if cfg.linear_num_value_heads > cfg.linear_num_key_heads else 2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        intermediate_size=0 if moe else 96,
        num_experts=min(cfg.num_experts, 16),
        num_experts_per_tok=min(cfg.num_experts_per_tok, 4),
        moe_intermediate_size=32 if moe else 0,
        shared_expert_intermediate_size=32 if cfg.shared_expert_intermediate_size else 0,
        vision=None,
        quantization=None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=20, help="tokens before the counted step")
    ap.add_argument("--top", type=int, default=25, help="list the most frequent ops")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (and install Triton): see the docstring")
    # the CPU's compiled GEMV kernels would take the matmuls (CPU tensors) out of ATen's sight:
    # a GPU runs them as ATen matmuls, so count those
    os.environ["QWEN35_NO_KERNELS"] = "1"
    from triton_interp import patch_fla_for_interpreter

    patch_fla_for_interpreter()
    from qwen35.engine.cuda_graphs import DecodeGraphs
    from qwen35.engine.forward_batch import ForwardBatch, allocate_caches
    from qwen35.loader import load_model
    from qwen35.ops.backend import interpreter_backend, reference_backend

    torch.manual_seed(0)
    cfg = tiny_like(args.model)
    model = load_model(cfg, dtype=torch.float32, device="cpu", load_format="random", seed=0,
                       progress=False)  # fmt: skip
    be = interpreter_backend(torch.float32)
    B, bs, blocks_per_seq = args.batch, 16, 8
    slots = B + 1
    caches = allocate_caches(model.config, B * blocks_per_seq + 1, bs, slots, torch.float32, "cpu")
    # prefill every row through the plain reference (not counted)
    n = args.prompt
    prompt_ids = torch.randint(2, cfg.vocab_size, (B * n,))
    table = [list(range(r * blocks_per_seq, (r + 1) * blocks_per_seq)) for r in range(B)]
    pre = ForwardBatch.build(
        positions=[p for _ in range(B) for p in range(n)],
        cu_seqlens=[r * n for r in range(B + 1)], context_lens=[n] * B,
        slot_mapping=[table[r][p // bs] * bs + p % bs for r in range(B) for p in range(n)],
        block_tables=table, state_slots=list(range(B)), has_initial_state=[False] * B,
        logits_indices=[(r + 1) * n - 1 for r in range(B)], device="cpu",
        backend=reference_backend("cpu"),
    )  # fmt: skip
    with torch.inference_mode():
        model(prompt_ids, pre, caches)
    graphs = DecodeGraphs(model, caches, be, B, blocks_per_seq, pad_block=B * blocks_per_seq,
                          pad_slot=B)  # fmt: skip
    graphs.eager = True
    step = ForwardBatch.build(
        positions=[n] * B, cu_seqlens=list(range(B + 1)), context_lens=[n + 1] * B,
        slot_mapping=[table[r][n // bs] * bs + n % bs for r in range(B)], block_tables=table,
        state_slots=list(range(B)), has_initial_state=[True] * B, logits_indices=list(range(B)),
        device="cpu", backend=be,
    )  # fmt: skip
    ids = torch.randint(2, cfg.vocab_size, (B,))
    with torch.inference_mode():
        graphs.run(ids, step)  # warm: first-call work (caches, lazy imports) not counted
        mode = KernelCount()
        restore = counting(mode)
        # count the forward a graph captures, not the buffer copies around it
        forward = graphs.model
        graphs.model = lambda *a: _under(mode, forward, *a)
        try:
            graphs.run(ids, step)
        finally:
            restore()
    layers = cfg.num_hidden_layers
    result = {
        "model": args.model,
        "batch": B,
        "layers": layers,
        "full_attention_layers": cfg.num_full_attention_layers,
        "moe": cfg.is_moe,
        "backend": be.name,
        "kernels_per_step": mode.total,
        "triton_launches": sum(mode.triton.values()),
        "aten_kernels": sum(mode.aten.values()),
        "host_reads": dict(mode.host_reads),
        "triton": dict(mode.triton.most_common()),
        "aten": dict(mode.aten.most_common()),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.model} ({layers} layers, {cfg.num_full_attention_layers} full attention"
          f"{', MoE' if cfg.is_moe else ''}), batch {B}, backend {be.name}")  # fmt: skip
    print(f"kernels per decode step: {mode.total} ({result['triton_launches']} Triton, "
          f"{result['aten_kernels']} ATen); {mode.total / layers:.1f} per layer")  # fmt: skip
    print(f"host reads: {dict(mode.host_reads) or 'none'}")
    both = Counter({f"triton:{k}": v for k, v in mode.triton.items()})
    both.update({k.replace("aten::", "aten:"): v for k, v in mode.aten.items()})
    for name, c in both.most_common(args.top):
        print(f"  {c:5d}  {name}")


def _under(mode, fn, *args):
    with mode:
        return fn(*args)


if __name__ == "__main__":
    main()
