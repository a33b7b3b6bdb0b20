"""The memory-bandwidth roofline of batch-1 decode, measured in the same run.

A decode step at batch 1 reads every weight once (the tied embedding once, as the output head),
the KV cache of the full-attention layers up to the context, and the DeltaNet states. Writes
(one KV row, the states back) are not counted: the floor is set by the reads. The fastest a
step can be is bytes / read bandwidth, with the bandwidth measured by torch `sum` over a
buffer much larger than the caches (median of a few passes).
"""

from __future__ import annotations

import time

import torch

from qwen35.cache_spec import cache_spec
from qwen35.config import ModelConfig

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


def decode_bytes_per_step(
    cfg: ModelConfig, weight_bytes: int, context_len: int, dtype: torch.dtype, batch: int = 1
) -> dict:
    """Bytes one decode step reads: weights once, plus per sequence its KV (context_len tokens
    of every full-attention layer, in the model dtype) and its DeltaNet states (conv in the
    model dtype, recurrent fp32), as the engine allocates them (cache_spec)."""
    dname = str(dtype).removeprefix("torch.")
    spec = cache_spec(cfg, kv_dtype=dname, conv_dtype=dname)
    kv = spec.kv_bytes_per_token * context_len * batch
    state = spec.state_bytes_per_sequence * batch
    return {
        "weights": weight_bytes,
        "kv": kv,
        "state": state,
        "total": weight_bytes + kv + state,
    }


def roofline_tokens_per_s(bytes_per_step: int, bandwidth: float, batch: int = 1) -> float:
    """Tokens/s if a step took exactly bytes / bandwidth."""
    return batch * bandwidth / bytes_per_step
