"""The memory-bandwidth roofline of batch-1 decode, measured in the same run.

What a decode step moves is the planner's formula (`qwen35.plan.decode_bytes`), applied to the
model as loaded: every dense weight once (a tied embedding once, as the output head; of an
untied input embedding only the looked-up rows), the KV cache of the full-attention layers up to
the context, and the DeltaNet states read and written back. The fastest a step can be is
bytes / read bandwidth, with the bandwidth measured by torch `sum` over a buffer much larger
than the caches (median of a few passes).
"""

from __future__ import annotations

import time

import torch

from qwen35.cache_spec import cache_spec
from qwen35.config import ModelConfig
from qwen35.plan.decode_bytes import decode_bytes
from qwen35.plan.planner import moe_touched_fraction
from qwen35.plan.sharding import RankWeights

MiB = 1 << 20


def measure_read_bandwidth(
    mib: int = 512, reps: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Read bandwidth in bytes/s: median over `reps` of torch.sum over `mib` MiB of fp32."""
    dev = torch.device(device)
    x = torch.ones(mib * MiB // 4, dtype=torch.float32, device=dev)
    x.sum()  # warm-up: page the buffer in
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        x.sum()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return x.numel() * 4 / times[len(times) // 2]


def model_weights(model: torch.nn.Module) -> RankWeights:
    """The model's parameter bytes (each tensor once), by how a decode step reads them."""
    cfg: ModelConfig = model.config
    unique = {p.data_ptr(): (name, p) for name, p in model.named_parameters()}.values()
    acc = {"dense": 0, "experts": 0, "embedding": 0}
    embed = model.get_submodule("model.embed_tokens").weight
    for name, p in unique:
        n = p.numel() * p.element_size()
        if ".mlp.experts." in name:  # routed experts (the shared expert is dense)
            acc["experts"] += n
        elif p.data_ptr() == embed.data_ptr() and not cfg.tie_word_embeddings:
            acc["embedding"] += n
        else:
            acc["dense"] += n
    return RankWeights(**acc, idle=0)


def decode_bytes_per_step(model: torch.nn.Module, context_len: int, batch: int = 1) -> dict:
    """Bytes one decode step of `batch` sequences at `context_len` moves (see the module
    docstring), with the caches as the engine allocates them (cache_spec; K/V as
    --kv-cache-dtype auto picks it); for a tensor-parallel rank's model, what that rank moves."""
    from qwen35.devices import model_kv_dtype

    cfg: ModelConfig = model.config
    # the compute dtype the engine allocates its conv states in (not the weights' storage)
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    dname = str(dtype).removeprefix("torch.")
    device = getattr(model, "device", None) or next(model.parameters()).device
    tp = getattr(model, "tp", None)
    size = tp.size if tp is not None else 1  # a tensor-parallel rank: its shard and caches
    kv = model_kv_dtype(model, str(device))
    spec = cache_spec(cfg, kv_dtype=kv, conv_dtype=dname, tp=size)
    return decode_bytes(
        model_weights(model),
        spec,
        sequences=batch,
        context=context_len,
        embedding_rows=model.get_submodule("model.embed_tokens").weight.shape[0],
        experts_touched=moe_touched_fraction(cfg, batch),
    ).as_dict()


def roofline_tokens_per_s(bytes_per_step: int, bandwidth: float, batch: int = 1) -> float:
    """Tokens/s if a step took exactly bytes / bandwidth."""
    return batch * bandwidth / bytes_per_step
