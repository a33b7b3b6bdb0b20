"""What serving a LoRA adapter per request costs: decode steps of requests with an adapter
against requests of the base model, in one engine (the adapter loaded throughout), rounds
interleaved. Qwen3.5-0.8B config (--model: another catalog model), random weights, `--dtype auto`, a random rank-r adapter on
every projection of the decoder (attention q/k/v/o, DeltaNet in_proj_qkv/z/a/b and out_proj,
MLP gate/up/down), greedy; batch 1 and a batch of 4 (all base, all adapter, 2 + 2 mixed).

    python bench/lora.py [--rank 16] [--rounds 4] [--threads 2] [--quantization int8]

Prints ms per decode step (medians per round) and the adapter / base ratio per round. A merged
adapter (`qwen35 quantize --lora`) runs at the base model's speed: the choice is one engine for
many adapters against one engine per fine-tune.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def write_adapter(model, path: Path, rank: int, seed: int = 0) -> None:
    """A PEFT-format adapter (adapter_config.json + adapter_model.safetensors) on every
    projection of the decoder, random A and B."""
    import torch
    from safetensors.torch import save_file

    from qwen35.layers.linear import Linear

    g = torch.Generator().manual_seed(seed)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_a",
               "in_proj_b", "out_proj", "gate_proj", "up_proj", "down_proj")  # fmt: skip
    tensors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and name.startswith("model.layers.") and \
                name.rsplit(".", 1)[-1] in targets:  # fmt: skip
            key = f"base_model.model.{name}"
            tensors[key + ".lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.02
            tensors[key + ".lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
    ))  # fmt: skip
    save_file(tensors, str(path / "adapter_model.safetensors"))


def batch_step_ms(eng, prompts, loras, new_tokens: int, tag: str) -> float:
    """Median ms of the decode steps where every request of the batch decodes."""
    from qwen35.request import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(prompts, loras, strict=True)):
        eng.add_request(f"{tag}{i}", p, sp, lora=lora)
    steps, started = [], set()
    while eng.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t0
        full = len(started) == len(prompts) and all(len(o.outputs[0].token_ids) for o in outs)
        if full and len(outs) == len(prompts) and not any(o.finished for o in outs):
            steps.append(dt)
        started |= {o.request_id for o in outs if o.outputs and o.outputs[0].token_ids}
    return statistics.median(steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per request")
    ap.add_argument("--quantization", default=None, help="int8 / int4 / fp8 / bf16")
    ap.add_argument("--model", default="Qwen3.5-0.8B", help="catalog name (random weights)")
    a = ap.parse_args()
    import torch

    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine

    torch.set_num_threads(a.threads)
    bm = load_bench_model(BenchOptions(model=a.model, threads=a.threads),
                          quantization=a.quantization)  # fmt: skip
    d = Path(tempfile.mkdtemp())
    write_adapter(bm.model, d / "adapter", a.rank)
    eng = make_engine(bm, max_num_seqs=4, max_model_len=512, enable_prefix_caching=False,
                      enable_lora=True)  # fmt: skip
    eng.add_lora("a", d / "adapter")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (128,), generator=g).tolist() for _ in range(4)]
    cases = {
        "batch 1, base": ([None], 1), "batch 1, adapter": (["a"], 1),
        "batch 4, base": ([None] * 4, 4), "batch 4, adapter": (["a"] * 4, 4),
        "batch 4, 2 base + 2 adapter": ([None, None, "a", "a"], 4),
    }  # fmt: skip
    batch_step_ms(eng, prompts[:1], [None], 4, "warm")  # (kernels, allocator)
    batch_step_ms(eng, prompts[:1], ["a"], 4, "warmA")
    res: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(a.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for k in order:
            loras, n = cases[k]
            res[k].append(batch_step_ms(eng, prompts[:n], loras, a.tokens, f"r{r}{k[:7]}"))
    print(f"{a.model} config, {bm.label} weights, a rank-{a.rank} adapter on every "
          f"projection, {a.threads} threads; ms per decode step, medians per round")  # fmt: skip
    for k in cases:
        print(f"  {k:32s} " + "  ".join(f"{v:7.2f}" for v in res[k]))
    for n in (1, 4):
        base, lora = res[f"batch {n}, base"], res[f"batch {n}, adapter"]
        ratios = [x / y for x, y in zip(lora, base, strict=True)]
        print(f"  batch {n}: adapter / base per round " + " ".join(f"{x:.2f}" for x in ratios)
              + f" (median {statistics.median(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
