"""What `LLMEngine` does differently under tensor parallelism, in one place: refuse layouts
before anything starts, start (or join) the group, hand workers their cache sizes, collect and
log each rank's memory."""

from __future__ import annotations

import logging
import os
import sys

import torch

from qwen35.errors import Qwen35Error
from qwen35.parallel.context import TensorParallel
from qwen35.parallel.group import WorkerGroup, broadcast, rank_device, torchrun_env

log = logging.getLogger("qwen35")
GiB = 1 << 30


def cpu_threads(requested: int | None, tp: int) -> int:
    """Threads per rank on a CPU: what was asked, else the cores shared out evenly."""
    return requested or max(1, (os.cpu_count() or 1) // tp)


def start(ec, model: str, dtype: torch.dtype) -> tuple[WorkerGroup, TensorParallel, torch.device]:
    """Validate the layout, start the workers (or, under torchrun on a rank other than 0, run
    this process as a worker and exit), and return rank 0's group, context and device."""
    from qwen35.loader import check_parallel_layout, peek_config

    size = ec.parallel.tensor_parallel_size
    ep = ec.parallel.enable_expert_parallel
    cfg = peek_config(model, ec.load.load_format)
    check_parallel_layout(cfg, size, size if ep else 1, ec.load.quantization)
    if ep and not cfg.is_moe:
        raise Qwen35Error(f"--enable-expert-parallel needs an MoE model; {cfg.name} is dense")
    device = torch.device(ec.device.device)
    if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
        raise Qwen35Error(
            f"--tensor-parallel-size {size} from {device} needs {size} GPUs here, but only "
            f"{torch.cuda.device_count()} are visible (several nodes: start with torchrun)"
        )
    args = {
        "model": model,
        "dtype": dtype,
        "device": ec.device.device,
        "load_format": ec.load.load_format,
        "quantization": ec.load.quantization,
        "int4_activations": ec.load.int4_activations,
        "yarn": ec.load.yarn,
        # the MTP head (speculative decoding's drafts): split like the model's layers
        "mtp": bool(ec.scheduler.num_speculative_tokens)
        and ec.scheduler.speculative_method == "mtp",
        "seed": 0 if ec.seed is None else ec.seed,  # random weights: as rank 0's
        "expert_parallel": ep,
        "threads": cpu_threads(ec.device.threads, size) if device.type == "cpu" else None,
        "timeout": ec.parallel.distributed_timeout,
        # LoRA adapters (engine/lora_adapters.py): whether stacked, and the slots; None: off
        "lora": lora_layout(ec, device) if ec.lora.enabled else None,
    }
    env = torchrun_env()
    if env is not None and env[0] != 0:
        from qwen35.parallel.worker import run_worker

        run_worker(env[0], env[1], "env://", env[2], args)
        sys.exit(0)  # rank 0 has shut the group down: this process's work is done
    group = WorkerGroup(size, ec.device.device, ec.parallel.distributed_timeout, args)
    group.start()
    local = env[2] if env is not None else 0
    return group, TensorParallel(0, size, ep), rank_device(ec.device.device, local)


def lora_layout(ec, device: torch.device) -> tuple[bool, int, int]:
    """(stacked, max_loras, max_lora_rank) of the engine's LoRA adapters (layers/lora.py)."""
    lc = ec.lora
    stacked = device.type == "cuda" if lc.lora_stacked is None else lc.lora_stacked
    return stacked, lc.max_loras, lc.max_lora_rank


def share_caches(group: WorkerGroup, **sizes) -> None:
    """Tell the workers how many KV blocks / state slots to allocate (rank 0 sized them)."""
    group.guard(broadcast, group.control, ("caches", sizes))


def gather_memory(group: WorkerGroup, mine: dict) -> list[dict]:
    import torch.distributed as dist

    out: list = [None] * group.size
    group.guard(dist.gather_object, mine, out, dst=0, group=group.control)
    return out


def describe_memory(rows: list[dict], num_blocks: int, block_size: int, num_slots: int) -> str:
    lines = []
    for m in rows:
        kv_dtype = f" {m['kv_dtype']}" if m.get("kv_dtype") else ""  # (no attention layers: none)
        state_dtype = f" (recurrent {m['state_dtype']})" if m.get("state_dtype") else ""
        lines.append(
            f"rank {m['rank']}: weights {m['weights_bytes'] / GiB:.3f} GiB, KV "
            f"{m['kv_bytes_per_token']} B/token{kv_dtype} ({m['kv_bytes'] / GiB:.3f} GiB for "
            f"{num_blocks}x{block_size} tokens), DeltaNet state {m['state_bytes_per_sequence']} "
            f"B/sequence{state_dtype} ({m['state_bytes'] / GiB:.3f} GiB for {num_slots} slots)"
            + (  # models/head_screen.py
                f", int8 screen of lm_head {m['head_screen_bytes'] / GiB:.3f} GiB"
                if m.get("head_screen_bytes")
                else ""
            )
        )
    return "per-rank memory:\n  " + "\n  ".join(lines)
