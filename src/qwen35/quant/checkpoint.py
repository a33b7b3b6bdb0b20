"""`qwen35 quantize IN_DIR OUT_DIR --to fp8 | bf16 | int4 | int8 [--lora ADAPTER]`: write a model
directory in the official block-FP8 layout, dequantise one back to BF16, or write it in
compressed-tensors' pack-quantized layout (int4 / int8: what llm-compressor writes, vLLM and SGLang
load, and this engine keeps as stored on a CPU); with a PEFT LoRA adapter merged into its weights
first (qwen35.lora): a LoRA fine-tune as a plain, FP8 or int4 release.

int4 / int8 output: the FP8 rule's matrices (not the MTP head's) as compressed_tensors.compress
writes them (4 bits asymmetric in groups of 128 inputs with integer zero points, round to
nearest, no calibration; 8 bits symmetric per channel), fused experts written per expert
(`mlp.experts.{e}.gate_proj`, ... as llm-compressor names them), a matrix whose inputs are no
whole groups left BF16 and named in the config's ignore list.

FP8 output (what vLLM, SGLang and this engine load): the same tensor names; every matrix of the
FP8 rule (`quant.apply.fp8_rule`, also inside MTP layers) becomes e4m3 with a BF16
`<name>_scale_inv` ([E, ...] per expert for fused experts, `.weight_scale_inv` otherwise) of
amax/448 per 128x128 block; everything else is copied unchanged; config.json gains
`quantization_config`. BF16 output drops the scales and `quantization_config`. Tokenizer,
chat template, processor and generation files are copied. Shards of at most `shard_bytes` with
a `model.safetensors.index.json`; everything is written into a temporary directory beside
OUT_DIR and renamed into place at the end; an existing OUT_DIR is replaced only with `force`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from qwen35 import compressed_tensors
from qwen35.config import ModelConfig
from qwen35.errors import Qwen35Error
from qwen35.lora import LoraAdapter
from qwen35.model_source import is_gguf_file
from qwen35.quant import formats, matmul
from qwen35.quant.apply import fp8_rule
from qwen35.weights import _ST_DTYPES, check_finite, open_safetensors

QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
DEFAULT_SHARD_BYTES = 4 * 2**30
TO = ("fp8", "bf16", "int4", "int8")
# tensors written right after their weight (kept in its shard, no step of the progress bar)
_AFTER_WEIGHT = ("_scale_inv", ".weight_scale", ".weight_shape", ".weight_zero_point")
_LAYER = re.compile(r"^(?:model\.language_model\.|model\.|mtp\.)layers\.\d+\.")
_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def fp8_target(key: str, rule: set[str]) -> str | None:
    """'linear' / 'fused' when the FP8 layout stores `key` in FP8, else None."""
    m = _LAYER.match(key)
    if not m:
        return None
    rest = key[m.end() :]
    if _FUSED.search("." + rest):
        return "fused" if "mlp.experts" in rule else None
    if _EXPERT.search("." + rest):
        return "linear" if "mlp.experts" in rule else None
    return "linear" if rest.endswith(".weight") and rest[: -len(".weight")] in rule else None


def scale_name(key: str, kind: str) -> str:
    return (
        key + "_scale_inv" if kind == "fused" else key.removesuffix(".weight") + ".weight_scale_inv"
    )


def _quantize(key: str, t: torch.Tensor, kind: str, cfg: ModelConfig):
    if kind == "linear":
        return matmul.quantize_fp8(t)
    if key.endswith("gate_up_proj") and cfg.moe_intermediate_size % formats.BLOCK:
        raise Qwen35Error(
            f"{key}: fused experts with moe_intermediate_size {cfg.moe_intermediate_size} "
            f"(not a multiple of {formats.BLOCK}) cannot share FP8 blocks between gate and up"
        )
    qs = [matmul.quantize_fp8(t[e]) for e in range(t.shape[0])]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _convert(
    files: list[Path],
    where: dict[str, Path],
    cfg: ModelConfig,
    to: str,
    lora: LoraAdapter | None = None,
    kept: list[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """where: every tensor's shard (`_headers`; a scale may sit in another shard). kept: where
    int4 / int8 leave a module's weight in BF16 (its inputs are no whole groups), by name."""
    rule = fp8_rule(cfg)
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                if key.endswith("_scale_inv"):
                    continue  # written with (or folded into) its weight
                t = f.get_tensor(key)
                check_finite(key, t, str(path))  # (NaN in, garbage out: refused, as loading does)
                scale = next(
                    (n for n in (key + "_scale_inv", scale_name(key, "linear")) if n in where),
                    None,
                )
                if t.dtype == formats.FP8_DTYPE:
                    if scale is None:
                        raise Qwen35Error(f"{path.name}: {key} is FP8 but the checkpoint has no "
                                          "scale for it")  # fmt: skip
                    if where[scale] == path:
                        s = f.get_tensor(scale)
                    else:
                        with open_safetensors(where[scale]) as g:
                            s = g.get_tensor(scale)
                    check_finite(scale, s, str(where[scale]))
                    adapted = lora is not None and lora.delta_for(key) is not None
                    if to == "fp8" and not adapted:
                        yield key, t
                        yield scale, s
                        continue
                    if t.dim() == 3:
                        t = torch.stack(
                            [formats.dequantize_fp8_blocks(t[e], s[e]) for e in range(len(t))]
                        )
                    else:
                        t = formats.dequantize_fp8_blocks(t, s)
                    if not adapted and to == "bf16":
                        yield key, t
                        continue
                if lora is not None:
                    t = lora.merge(key, t)  # (an FP8 weight dequantised above: quantised again)
                kind = fp8_target(key, rule) if to != "bf16" else None
                if to in ("int4", "int8") and key.startswith("mtp."):
                    kind = None  # (compressed_tensors.IGNORE: the MTP head stays BF16)
                if kind is None:
                    yield key, t
                elif to == "fp8":
                    q, s = _quantize(key, t, kind, cfg)
                    yield key, q
                    yield scale_name(key, kind), s
                else:
                    yield from _compressed(key, t, kind, int(to[3:]), kept)


def _compressed(key: str, t: torch.Tensor, kind: str, bits: int, kept: list[str]):
    """A weight (fused experts: each expert's gate, up and down, as llm-compressor names them)
    as compressed-tensors' pack-quantized tensors; one whose inputs are no whole groups of 128
    (4 bits) stays BF16, its module named in `kept` (the config's ignore list)."""
    if kind == "fused":
        base = key.rsplit(".", 1)[0]  # ...mlp.experts
        parts = ("gate", "up") if key.endswith("gate_up_proj") else ("down",)
        for e in range(t.shape[0]):
            for i, part in enumerate(parts):
                w = t[e].chunk(len(parts))[i]
                yield from _compressed(f"{base}.{e}.{part}_proj.weight", w, "linear", bits, kept)
        return
    module = key.removesuffix(".weight")
    if bits == 4 and t.shape[1] % 128 or t.shape[0] % 8:
        kept.append(module)
        yield key, t
        return
    for suffix, v in compressed_tensors.compress(t, bits).items():
        yield f"{module}.{suffix}", v


def _steps(where: dict, shapes: dict, cfg: ModelConfig, to: str) -> int:
    """The weights written (the progress bar's steps): every tensor but scales, fused experts
    under int4 / int8 one a projection of each expert."""
    rule, n = fp8_rule(cfg), 0
    for k in where:
        if k.endswith("_scale_inv"):
            continue
        fused = to in ("int4", "int8") and fp8_target(k, rule) == "fused"
        n += shapes[k][0] * (2 if k.endswith("gate_up_proj") else 1) if fused else 1
    return n


def _config(src: Path, to: str, kept: list[str] = ()) -> dict:
    raw = json.loads((src / "config.json").read_text())
    for d in (raw, raw.get("text_config") or {}):
        d.pop("quantization_config", None)
    if to == "fp8":
        raw["quantization_config"] = dict(QUANT_CONFIG)
    elif to in ("int4", "int8"):
        qc = compressed_tensors.quantization_config(int(to[3:]))
        qc["ignore"] += sorted(kept)
        raw["quantization_config"] = qc
    return raw


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "fp8",
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    lora: str | Path | None = None,
) -> Path:
    """lora: a PEFT LoRA adapter directory merged into the weights first (qwen35.lora)."""
    from safetensors.torch import save_file

    from qwen35.loader import check_checkpoint

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if to not in TO:
        raise Qwen35Error(f"--to must be one of {', '.join(TO)}, got {to!r}")
    gguf = is_gguf_file(src)
    if gguf:  # llama.cpp's file: its model directory (gguf_checkpoint.py) is read as any other
        from qwen35.gguf_checkpoint import model_dir

        src = model_dir(src)
    if not (src / "config.json").is_file():
        raise Qwen35Error(f"{src} has no config.json: pass a model directory")
    if dst.exists() and not force:
        raise Qwen35Error(f"{dst} exists; pass --force to replace it")
    if dst.resolve() == src.resolve():
        raise Qwen35Error("OUT_DIR must differ from IN_DIR")
    cfg, files = check_checkpoint(src)  # refused before anything is read or written
    where, shapes = _headers(files)
    total = _steps(where, shapes, cfg, to)  # the bar's
    adapter = None
    if lora is not None:  # checked against the base before anything is written
        adapter = LoraAdapter(lora)
        adapter.check_base(shapes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        bar = _bar(total, to) if progress else None
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        names: list[str] = []
        kept: list[str] = []
        for key, t in _convert(files, where, cfg, to, adapter, kept):
            if gguf and t.dim() >= 2 and t.dtype == torch.float32:
                t = t.to(torch.bfloat16)  # dequantized matrices: BF16 as the official releases
            t = t.contiguous()
            nbytes = t.numel() * t.element_size()
            # a scale stays in its weight's shard (it comes right after it)
            if size and size + nbytes > shard_bytes and not key.endswith(_AFTER_WEIGHT):
                names.append(_write(shards[-1], tmp, len(names), save_file))
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += nbytes
            if bar is not None and not key.endswith(_AFTER_WEIGHT):
                bar[0].update(bar[1], advance=1)
        names.append(_write(shards[-1], tmp, len(names), save_file))
        _index(tmp, names)
        (tmp / "config.json").write_text(json.dumps(_config(src, to, kept), indent=2) + "\n")
        for p in src.iterdir():  # tokenizer, chat template, processor, generation config ...
            if (
                p.is_file()
                and p.suffix != ".safetensors"
                and p.name
                not in (
                    "config.json",
                    "model.safetensors.index.json",
                    "gguf.json",  # (a GGUF file's model directory: what stands for the file)
                    "tensors.json",
                )
            ):
                shutil.copy2(p, tmp / p.name)
        if bar is not None:
            bar[0].stop()
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{tmp.name[-8:]}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write(tensors: dict, tmp: Path, i: int, save_file) -> str:
    name = f"part-{i:05d}.safetensors"  # renamed model-XXXXX-of-NNNNN once N is known
    save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    tensors.clear()
    return name


def _index(tmp: Path, parts: list[str]) -> None:
    n = len(parts)
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (tmp / part).rename(tmp / final)
        with open_safetensors(tmp / final) as f:
            for k in f.keys():
                weight_map[k] = final
                t = f.get_slice(k)
                total += math.prod(t.get_shape()) * _ST_DTYPES[t.get_dtype()].itemsize
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(doc, indent=2) + "\n")


def _headers(files: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Every tensor's shard file and shape, from one read of each shard's header."""
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with open_safetensors(path) as f:
            for k in f.keys():
                where[k] = path
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return where, shapes


def _bar(total: int, to: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = Progress(
        TextColumn(f"writing {to}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    p.start()
    return p, p.add_task(to, total=total)
