"""`qwen35 plan -m FILE.gguf`: a llama.cpp GGUF file planned as the engine loads it.

The config comes from the file's metadata (gguf_checkpoint.model_dir: the cached model
directory a load uses too). On a CPU (the file's home) the weights take the storage `--dtype
auto` gives the file (int4 for 4-bit files, int8 for 8-bit ones) or `--dtype int8 | int4`, and
each tensor is counted as the loader stores it: under int4 a Q4_0 / Q4_1 / Q4_K tensor keeps its
values in int4 groups of 32, one of more than 5 bits a weight (a Q4_K_M's Q6_K tensors) becomes
int8, the rest int4 groups of 128 (`plan.params.int_matrix_bytes`, from the file's tensor types:
`GGUFCheckpoint.int4_kind`). A GPU engine holds it the same way (`--dtype auto`: since session
55, BF16 before), which the GPU planner counts by `rank_bytes` on one GPU (under -tp N each rank
quantizes its slices again: the config's formulas).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen35.config import ModelConfig
from qwen35.model_source import file_path, is_gguf_file, ollama_name_of
from qwen35.plan.params import Tensor, int_matrix_bytes, tensor_bytes, text_tensors
from qwen35.plan.planner import PlanError

_PRE = "model.language_model"
_EXPERTS = {  # a GGUF checkpoint's fused expert tensors -> the inventory's per-expert names
    "mlp.experts.gate_up_proj": ("mlp.experts.{e}.gate_proj.weight",
                                 "mlp.experts.{e}.up_proj.weight"),
    "mlp.experts.down_proj": ("mlp.experts.{e}.down_proj.weight",),
}  # fmt: skip


@dataclass
class GgufModel:
    path: Path
    cfg: ModelConfig
    file_bytes: int  # all shards
    file_type: str  # the type of most matrix weights ("Q4_K", "Q8_0", ...)
    storage: str | None  # what `--dtype auto` loads it as on a CPU: "int4", "int8" or None
    # text tensors: (transformers name, shape, int4_kind), as GGUFCheckpoint presents them
    tensors: list[tuple[str, tuple[int, ...], str | None]]


def is_gguf(spec: str | None) -> bool:
    """A GGUF file (suffix or magic bytes: model_source.is_gguf_file), or a path named .gguf
    (its loading then says what is wrong with it)."""
    return spec is not None and (Path(spec).suffix.lower() == ".gguf" or is_gguf_file(spec))


def launch_model(spec: str | None) -> str | None:
    """What the launch commands name for the model planned (`plan -m SPEC`): a GGUF file's or a
    model directory's path, a Hub repository that is not a catalog name as given; None for a
    catalog name (launch.hub_id: its official repository)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if is_gguf(spec) or path.is_dir():
        return str(path)
    if path.is_file():  # (a config.json)
        return str(path.parent)
    from qwen35.catalog import UnknownNameError, resolve_name

    try:
        resolve_name(spec)
        return None
    except UnknownNameError:
        return spec if spec.count("/") == 1 else None


def serve_model(spec: str | None) -> str | None:
    """What a `qwen35 serve` line names for a GGUF file: an Ollama blob by its Ollama name
    (`ollama:NAME`, what was planned), any other file by its path (else None)."""
    if not is_gguf(spec):
        return None
    name = ollama_name_of(spec)
    return f"ollama:{name}" if name is not None else launch_model(spec)


def load(spec: str) -> GgufModel:
    """The file's config, size, type and text tensors (the first use writes the cached model
    directory, ~2 s for a Qwen 3.5 vocabulary; later ones read it)."""
    from qwen35.gguf_checkpoint import GGUFCheckpoint, model_dir, pointer_info, shard_paths

    path = file_path(spec)
    d = model_dir(path)
    info = pointer_info(d)
    shards = shard_paths(path)
    tensors = []
    for shard in shards:
        ck = GGUFCheckpoint(shard)
        for key in ck.keys():
            if not key.startswith(("mtp.", "model.visual.")):
                tensors.append((key, tuple(ck.get_slice(key).get_shape()), ck.int4_kind(key)))
    cfg = ModelConfig.from_hf(d, name=ollama_name_of(path))  # (an Ollama blob: its name)
    return GgufModel(path, cfg, sum(p.stat().st_size for p in shards),
                     info.get("file_type", "?"), info.get("default_quantization"), tensors)  # fmt: skip


def inventory_names(key: str) -> tuple[str, ...]:
    """The plan inventory's names (plan.params.text_tensors) of a GGUF checkpoint's tensor."""
    m = re.match(r"^model\.layers\.\d+\.(.+)$", key)
    if m is None:
        return (f"{_PRE}.{key.removeprefix('model.')}",) if key.startswith("model.") else (key,)
    rest = m[1]
    return tuple(f"{_PRE}.layers.{{i}}.{r}" for r in _EXPERTS.get(rest, (rest,)))


def bytes_by_tensor(model: GgufModel, inventory: list[Tensor], fmt: str) -> dict[str, int]:
    """{inventory name: bytes of all its copies} with the file's tensors stored in `fmt` ("int8"
    / "int4"; "bf16": 2 bytes a weight), each as the quantizing loader stores it (module doc)."""
    by_name = {t.name: t for t in inventory}
    out = {t.name: 0 for t in inventory}
    for key, shape, kind in model.tensors:
        names = inventory_names(key)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise PlanError(f"{model.path.name}: tensor {key} has no place in the plan of "
                            f"{model.cfg.name} ({missing[0]})")  # fmt: skip
        if len(names) > 1:  # the gate and up halves of a fused [E, 2I, H]
            shape = (shape[0], shape[1] // len(names), shape[2])
        for n in names:
            out[n] += _bytes(by_name[n], shape, fmt, kind)
    return out


def _bytes(t: Tensor, shape: tuple[int, ...], fmt: str, kind: str | None) -> int:
    """One GGUF tensor's bytes: a projection with a kind (int4_kind) by int_matrix_bytes, as
    quant/apply.py _int_linear stores it; anything else (the vocabulary tables, norms, routers,
    a projection the file keeps in 16 bits) by tensor_bytes' own rules."""
    if fmt not in ("int8", "int4") or kind is None or not t.fp8:
        copies = shape[0] if t.expert else 1
        return tensor_bytes(t, fmt, shape=shape[1:] if t.expert else shape, count=copies)
    if t.expert:  # [E, out, in]: each expert's matrix (quant/apply.py _int_experts)
        return shape[0] * int_matrix_bytes(shape[1], shape[2], fmt, kind)
    return int_matrix_bytes(shape[0], shape[-1], fmt, kind)


def bytes_of(model: GgufModel, inventory: list[Tensor]) -> Callable[[Tensor, str], int]:
    """A `tensor_bytes` stand-in for plan.cpu: an inventory tensor's bytes from the file."""
    cache: dict[str, dict[str, int]] = {}

    def of(t: Tensor, fmt: str) -> int:
        if fmt not in cache:
            cache[fmt] = bytes_by_tensor(model, inventory, fmt)
        return cache[fmt][t.name]

    return of


def rank_bytes(model: GgufModel, fmt: str):
    """plan.sharding.rank_weights' `bytes_of` for the file in `fmt` ("int8" / "int4") on one GPU:
    its text tensors as the loader stores them (bytes_of), any other (or a share of one) by
    tensor_bytes."""
    inventory = text_tensors(model.cfg)
    of, names = bytes_of(model, inventory), {t.name for t in inventory}

    def fn(t: Tensor, shape: tuple[int, ...] | None = None, count: int = 0) -> int:
        if t.name in names and shape in (None, t.shape) and count in (0, t.count):
            return of(t, fmt)
        return tensor_bytes(t, fmt, shape, count)

    return fn
