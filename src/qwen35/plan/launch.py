"""The command lines that start a planned deployment: qwen35 itself (one node: `qwen35 serve
-tp N`; more than one: `torchrun` on every node), and the equivalent vLLM and SGLang commands
for users of those engines. No torch here.

One replica per command: with dp > 1 (the planner's replicas) run that many copies, each on its
own GPUs, behind a load balancer.
"""

from __future__ import annotations

import json

from qwen35.plan.params import has_fp8
from qwen35.plan.planner import Deployment

GPUS_PER_NODE = 8
MASTER_PORT = 29500


def fp8_at_load(dep: Deployment) -> bool:
    """FP8 planned for a model without an FP8 checkpoint: the engine quantizes the BF16 weights
    at load (`--quantization fp8`) into the official layout the planner counts. Not for a
    compressed-tensors / GPTQ / AWQ checkpoint: every engine reads its own quantization (ours
    holds 4-bit ones in FP8 by itself: CompressedConfig.fp8_rows)."""
    return dep.dtype == "fp8" and not has_fp8(dep.cfg) and dep.cfg.compressed is None


def hub_id(dep: Deployment) -> str:
    """The Hub repository of the planned weights (the FP8 release for dtype fp8, where one
    exists)."""
    name = dep.cfg.name
    if "/" in name or not name.startswith("Qwen3.5-"):
        return name  # a local config or fine-tune: the user's own path
    if dep.dtype == "fp8" and not name.endswith("-FP8") and not fp8_at_load(dep):
        name += "-FP8"
    return f"Qwen/{name}"


def launch_commands(
    dep: Deployment, context: int, model: str | None = None, gpus_per_node: int = GPUS_PER_NODE
) -> dict[str, str]:
    """{"qwen35": ..., "vllm": ..., "sglang": ...} for one replica of `dep` at `context` tokens."""
    model = model or hub_id(dep)
    tp = dep.tp
    weight_only = dep.dtype in ("int8", "int4")
    theirs = model  # what vLLM / SGLang load: under int8 / int4 a checkpoint quantized first
    native = dep.cfg.compressed is not None or model.lower().endswith(".gguf")  # (read as is)
    if weight_only and not native:
        theirs = f"./{model.rstrip('/').rsplit('/', 1)[-1]}-{dep.dtype}"
    ep = dep.ep_size > 1
    nodes = -(-tp // gpus_per_node)
    per_node = min(tp, gpus_per_node)
    ours = f"--model {model} -tp {tp} --max-model-len {context} --device cuda"
    at_load = " --quantization fp8" if fp8_at_load(dep) else ""  # (all three engines' flag)
    ours += at_load
    if weight_only:  # (a 4-bit checkpoint too: --dtype auto holds it in FP8 on a GPU)
        ours += f" --quantization {dep.dtype}"
    if ep:
        ours += " --enable-expert-parallel"
    ngram = dep.speculative_tokens and dep.speculative_method == "ngram"
    if dep.speculative_tokens:
        ours += f" --num-speculative-tokens {dep.speculative_tokens}"
    if ngram:
        ours += " --speculative-method ngram"
    yarn = dep.cfg.yarn
    if yarn is not None:
        ours += f" --yarn {yarn.factor:g}"
    fp8_kv = dep.kv_dtype == "fp8"
    if fp8_kv:  # e4m3, unscaled: vLLM's "fp8" without calibrated scales, SGLang's "fp8_e4m3"
        ours += " --kv-cache-dtype fp8"
    if dep.state_dtype == "bf16":  # (vLLM's flag name; SGLang's --mamba-ssm-dtype)
        ours += " --mamba-ssm-cache-dtype bf16"
    if nodes == 1:
        qwen35 = f"qwen35 serve {ours}"
    else:
        qwen35 = (
            f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank $NODE_RANK "
            f"--master-addr $MASTER_ADDR --master-port {MASTER_PORT} -m qwen35.cli serve {ours}"
            "   # on every node; NODE_RANK 0 serves HTTP"
        )
    vllm = f"vllm serve {theirs} --tensor-parallel-size {tp} --max-model-len {context}{at_load}"
    if ep:
        vllm += " --enable-expert-parallel"
    if dep.speculative_tokens:
        spec = {"method": "ngram" if ngram else "mtp", "num_speculative_tokens": dep.speculative_tokens}
        if ngram:  # the engine's own prompt-lookup defaults (engine/config.py, no torch)
            from qwen35.engine.config import SchedulingConfig

            d = SchedulingConfig()
            spec.update(prompt_lookup_max=d.prompt_lookup_max, prompt_lookup_min=d.prompt_lookup_min)
        vllm += f" --speculative-config '{json.dumps(spec)}'"
    if yarn is not None:  # the model card's rope_parameters edit, as an override
        vllm += f" --hf-overrides '{_yarn_override(dep.cfg)}'"
    if fp8_kv:
        vllm += " --kv-cache-dtype fp8"
    if dep.state_dtype == "bf16":
        vllm += " --mamba-ssm-cache-dtype bfloat16"
    if nodes > 1:
        vllm += " --distributed-executor-backend ray   # on a Ray cluster spanning the nodes"
    sglang = (
        f"python -m sglang.launch_server --model-path {theirs} --tp {tp} --context-length "
        f"{context}{at_load}"
    )
    if ep:
        sglang += f" --ep-size {tp}"
    if dep.speculative_tokens and not ngram:  # SGLang's MTP ("NEXTN"): k steps, +1 verified
        k = dep.speculative_tokens
        sglang += (
            f" --speculative-algorithm NEXTN --speculative-num-steps {k} "
            f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}"
        )
    if yarn is not None:
        sglang += f" --json-model-override-args '{_yarn_override(dep.cfg)}'"
    if fp8_kv:
        sglang += " --kv-cache-dtype fp8_e4m3"
    if dep.state_dtype == "bf16":
        sglang += " --mamba-ssm-dtype bfloat16"
    if nodes > 1:
        sglang += (
            f" --nnodes {nodes} --node-rank $NODE_RANK --dist-init-addr $MASTER_ADDR:{MASTER_PORT}"
        )
    if ngram:
        sglang += "   # without drafts: n-gram drafts in SGLang are not checked for Qwen 3.5 here"
    if theirs != model:  # `qwen35 quantize` writes compressed-tensors, which both read
        first = f"qwen35 quantize {model} {theirs} --to {dep.dtype} && "
        vllm, sglang = first + vllm, first + sglang
    return {"qwen35": qwen35, "vllm": vllm, "sglang": sglang}


def _yarn_override(cfg) -> str:
    """The config.json override that gives vLLM / SGLang the planned YaRN scaling."""
    return json.dumps({"text_config": {"rope_parameters": cfg.rope_parameters()}})
