"""GPU catalog (`gpus.json`): memory, bandwidth and dense BF16 peak, each with its source.

`load_gpu("rtx 4090")` resolves loose spellings ("4090", "H100", "nvidia h200"); an unknown name
raises UnknownNameError with "did you mean". `custom_gpu(memory_gib=...)` stands for any other GPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from qwen35.catalog import did_you_mean

_PATH = resources.files(__package__) / "gpus.json"


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    bandwidth_gb_s: float | None = None  # 1e9 bytes/s; None: no decode-speed estimate
    bf16_tflops: float | None = None  # dense, 1e12 FLOP/s
    source: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "memory_gib": self.memory_gib,
            "bandwidth_gb_s": self.bandwidth_gb_s,
            "bf16_tflops": self.bf16_tflops,
            "source": self.source,
        }


def _key(name: str) -> str:
    low = name.lower()
    for word in ("nvidia", "geforce", "amd", "instinct"):
        low = low.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", low)


@lru_cache(maxsize=1)
def _catalog() -> dict:
    return json.loads(_PATH.read_text())


def gpu_names() -> list[str]:
    return [g["name"] for g in _catalog()["gpus"]]


def common_gpu_names() -> list[str]:
    """The few GPUs the default `qwen35 plan` output shows."""
    return list(_catalog()["common"])


def load_gpu(name: str) -> GpuSpec:
    want = _key(name)
    for g in _catalog()["gpus"]:
        if want and want in {_key(n) for n in [g["name"], *g.get("aliases", [])]}:
            return GpuSpec(
                name=g["name"],
                memory_gib=float(g["memory_gib"]),
                bandwidth_gb_s=float(g["bandwidth_gb_s"]),
                bf16_tflops=float(g["bf16_tflops"]),
                source=g["source"],
            )
    raise did_you_mean("GPU", name, gpu_names())


def custom_gpu(
    memory_gib: float, bandwidth_gb_s: float | None = None, bf16_tflops: float | None = None
) -> GpuSpec:
    """A GPU given only by its numbers (`--gpu-memory`)."""
    if not memory_gib > 0:
        raise ValueError(f"GPU memory must be a positive number of GiB, got {memory_gib}")
    if bandwidth_gb_s is not None and not bandwidth_gb_s > 0:
        raise ValueError(f"GPU bandwidth must be a positive number of GB/s, got {bandwidth_gb_s}")
    return GpuSpec(
        f"{memory_gib:g} GiB GPU", memory_gib, bandwidth_gb_s, bf16_tflops, "--gpu-memory"
    )
