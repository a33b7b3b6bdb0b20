"""`load_model`: a Qwen 3.5 text model from a model directory, a Hub id, or random weights.

The model is built under `torch.device("meta")` (no memory, no init cost), then each parameter
is allocated once in the target dtype/device and filled from the checkpoint (see
`qwen35.weights`) or with random values. Our model holds no buffers (rotary frequencies are
computed on first use); a custom `model_factory` whose module computes buffers at construction
builds those on a real device itself (`with torch.device("cpu"):`), or loading stops and says so.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qwen35 import heap
from qwen35.config import ConfigError, ModelConfig
from qwen35.devices import default_quantization
from qwen35.errors import Qwen35Error
from qwen35.model_source import hub_cache_dir, hub_offline, is_gguf_file, local, needs_resolving
from qwen35.parallel.context import SINGLE, TensorParallel
from qwen35.weights import (
    CheckpointError,
    LoadReport,
    checkpoint_files,
    mismatch_error,
    open_safetensors,
    read_into,
    stored_embedding_dtype,
)
from qwen35.weights import scan as scan_headers

__all__ = ["load_model", "CheckpointError", "LoadReport", "parse_dtype", "init_random_"]

log = logging.getLogger("qwen35.loader")

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
LOAD_FORMATS = ("auto", "safetensors", "random")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]

ModelFactory = Callable[[ModelConfig], nn.Module]


def parse_dtype(dtype: str | torch.dtype, cfg: ModelConfig | None = None) -> torch.dtype:
    """ "bf16" / "bfloat16" / "fp16" / "fp32" / torch.dtype; "auto" = the config's dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        key = (cfg.dtype if cfg is not None else "bfloat16").lower()
    if key not in _DTYPES:
        raise Qwen35Error(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return _DTYPES[key]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise Qwen35Error(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Qwen35Error(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise Qwen35Error(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) present")
    return dev


# ---- public API ---------------------------------------------------------------------------------
def load_model(
    path_or_name: str | Path | ModelConfig,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    *,
    progress: bool | None = None,
    seed: int = 0,
    model_factory: ModelFactory | None = None,
    tp: TensorParallel = SINGLE,
    vision: bool | str = False,
    quantization: str | None = None,
    mtp: bool = False,
    yarn: float | None = None,
    gguf_int4: str = "keep",
) -> nn.Module:
    """Load a Qwen 3.5 text model, in eval mode and without gradients.

    path_or_name: a model directory (config.json + safetensors, official VLM or flat text
    layout), a Hub id ("Qwen/Qwen3.5-0.8B", through the local Hugging Face cache), or for
    load_format="random" a catalog name / config path / ModelConfig; "random:NAME" is short for
    that. progress: a progress bar while reading (default: when stderr is a terminal).
    model_factory: builds the module from the config (default: qwen35's Qwen35ForCausalLM).
    tp: this process's tensor-parallel rank: the layout is checked (sharding.validate_layout)
    before any weight is read, the model holds the rank's shard, and only the rank's slices of
    each checkpoint tensor are read (random weights: the same seed on every rank, so replicated
    weights such as the router agree across ranks; the shards are not slices of tp=1's values).
    vision: also build and load the vision tower (`model.visual.*`, strictly) when the config
    has one; False skips those tensors (text only: no tower memory); "auto": load it when the
    checkpoint has any `model.visual.*` tensor (random weights: when the config has a tower).
    Under tensor parallelism the tower is not split: the engine loads it on rank 0 only, which
    encodes images and sends the embeddings with each step (the other ranks load text only).
    mtp: also build and load the multi-token-prediction head (`mtp.*`, strictly; speculative
    decoding drafts with it); the config must have one (mtp_num_hidden_layers).
    yarn: YaRN RoPE scaling by this factor over the native context (ModelConfig.with_yarn);
    None: as the config says.
    gguf_int4: a GGUF file under int4: "keep" its 4-bit values (gguf_checkpoint int4_hint) or
    "requantize" every matrix to int4 groups of 128.
    quantization: "fp8" / "int8" / "int4" quantizes the loaded weights in memory (qwen35.quant);
    "bf16" (with dtype fp32) stores the weights in bf16 and computes in fp32 (allocated so at
    load: no fp32 copy of the weights); None keeps them as stored (an official FP8 checkpoint
    stays FP8).
    Returns the model with `.config` (ModelConfig, unless the module already has a config),
    `.load_report` (LoadReport) and `.model_dir` (the local directory, for the tokenizer; None
    for random weights without a directory).
    """
    t0 = time.perf_counter()
    if load_format not in LOAD_FORMATS:
        raise Qwen35Error(f"unknown load_format {load_format!r}; use one of {LOAD_FORMATS}")
    if isinstance(path_or_name, str) and path_or_name.startswith("random:"):
        path_or_name, load_format = path_or_name[len("random:") :], "random"
    path_or_name = local_model(path_or_name)
    dev = parse_device(device)
    if mtp and model_factory is not None:
        raise Qwen35Error("mtp=True builds the default model (no model_factory)")
    if vision == "auto":
        vision = load_format == "random" or _has_visual_tensors(path_or_name)
    if load_format == "random":
        cfg, directory = _random_config(path_or_name)
        cfg = cfg if yarn is None else cfg.with_yarn(yarn)
        vision = bool(vision) and cfg.vision is not None
        _check_layout(cfg, tp, model_factory, quantization)
        torch_dtype = parse_dtype(dtype, cfg)
        report = LoadReport(
            f"random:{cfg.name}", "random", _name(torch_dtype), str(dev), config=cfg
        )
        _check_mtp(cfg, mtp)
        model, _ = build_model(cfg, None, None, model_factory, tp, vision, mtp)
        if _unquantized_in_bf16(cfg, quantization, torch_dtype, dev, None):
            _narrow_unquantized(model, torch_dtype, report)
        quantization = _bf16_storage(model, quantization, torch_dtype, dev, report)
        if random_fp8(cfg, quantization):  # FP8 storage drawn directly (no BF16 copy first)
            from qwen35.quant.apply import rule_modules, swap_to_fp8_meta

            n_fp8 = len(swap_to_fp8_meta(model, rule_modules(model, cfg), cfg))
            report.notes.append(f"FP8: {n_fp8} modules in FP8 (random)")
            model.quantization = "fp8"  # (as quantize_model_ marks its formats)
            quantization = None
        on_read = _quantize_on_read(model, cfg, quantization, torch_dtype, dev, tp.size == 1)
        defer = _deferred(on_read)
        _warn_if_short_of_memory(model, cfg, torch_dtype, dev, on_read, defer, tp)
        params = materialize(model, cfg, torch_dtype, dev, defer)
        init_random_(params, seed, on_read)  # shards are equal-sized: the ranks' draws in step
        _finish_reading(on_read, report)
        _zero_padding(params, cfg, tp)
        n = sum(p.numel() for p in params.values())
        bf16_weights = getattr(model, "quantization", None) == "bf16"
        log.warning(
            "random weights: %s (%.2fB parameters, %s) is NOT a real checkpoint; outputs are "
            "meaningless (benchmarks only)",
            cfg.name,
            n / 1e9,
            report.dtype + (" on bf16 weights" if bf16_weights else ""),
        )
    else:
        directory = resolve_model_dir(path_or_name)
        cfg = ModelConfig.from_hf(directory)
        cfg = cfg if yarn is None else cfg.with_yarn(yarn)
        vision = bool(vision) and cfg.vision is not None
        _check_layout(cfg, tp, model_factory, quantization)
        torch_dtype = parse_dtype(dtype, cfg)
        report = LoadReport(str(directory), "safetensors", _name(torch_dtype), str(dev), config=cfg)
        files = checkpoint_files(directory)
        report.files = [f.name for f in files]
        _check_mtp(cfg, mtp)
        model, params = build_model(cfg, None, None, model_factory, vision=vision, mtp=mtp)
        storage = _bf16_storage(model, quantization, torch_dtype, dev, report)
        narrow = _unquantized_in_bf16(cfg, quantization, torch_dtype, dev, files)
        if narrow:
            _narrow_unquantized(model, torch_dtype, report)
        ts = time.perf_counter()
        s, fp8_names = _scan_against(model, cfg, files, directory)
        report.seconds_scan = time.perf_counter() - ts
        report.skipped = dict(s.skipped)
        if fp8_names:
            report.notes.append(f"FP8: {len(fp8_names)} modules kept in FP8")
        shard = None
        if tp.size > 1:  # scanned against the full model; allocate and read the rank's shard
            from qwen35.parallel.loading import ShardReader

            full = _canonical(model)[0]  # the scanned (full-size) parameters
            shard = ShardReader(cfg, tp, {n: tuple(p.shape) for n, p in full.items()})
            model, _ = build_model(cfg, None, None, None, tp, vision, mtp)
            _bf16_storage(model, quantization, torch_dtype, dev)
            if narrow:
                _narrow_unquantized(model, torch_dtype)
            if fp8_names:
                from qwen35.quant.apply import swap_to_fp8_meta

                swap_to_fp8_meta(model, fp8_names, cfg)  # the same modules, at shard sizes
        vocab = tp.size == 1 and s.tied_duplicate is None  # (QuantizeOnRead's docstring)
        on_read = _quantize_on_read(model, cfg, storage, torch_dtype, dev, vocab)
        if on_read is not None and gguf_int4 == "requantize":
            on_read.take_hints = False
        defer = _deferred(on_read)
        _warn_if_short_of_memory(model, cfg, torch_dtype, dev, on_read, defer, tp, files)
        params = materialize(model, cfg, torch_dtype, dev, defer)
        _zero_padding(params, cfg, tp)
        show = progress if progress is not None else sys.stderr.isatty()
        read_into(s, params, report, show, shard, on_read)
        _finish_reading(on_read, report)
        log.info("%s", report.summary())
        quantization = storage
    # the name -> tensor view of the weights must not outlive the reads: packing (post_load) and
    # quantization replace tensors, and the originals would stay alive beside their copies
    del params
    if getattr(model, "config", None) is None:
        model.config = cfg
    if quantization:
        from qwen35.quant.apply import quantize_model_

        quantize_model_(model, quantization, torch_dtype)
        report.notes.append(f"quantized in memory to {quantization}")
    _finish(model, cfg)
    if dev.type == "cpu":
        heap.release()  # what quantizing and post_load's packing freed
    report.seconds_total = time.perf_counter() - t0
    model.load_report = report
    model.model_dir = directory
    return model


def peek_config(model: str, load_format: str = "auto") -> ModelConfig:
    """The model's config without reading any weight (layout checks before workers start, the
    checkpoint's stored dtype for `--dtype auto`)."""
    if load_format == "random" or model.startswith("random:"):
        return _random_config(model.removeprefix("random:"))[0]
    return ModelConfig.from_hf(resolve_model_dir(model))


def auto_quantization(model: str, load_format: str, dtype: str, device) -> str | None:
    """The weight storage `--dtype auto` goes with for `model` on `device`
    (devices.default_quantization), reading only its config, and that only where a BF16
    checkpoint would get one. A quantized GGUF file: int8 or int4, on any device
    (gguf_checkpoint.default_quantization: its memory stays near the file's, as in llama.cpp and
    vLLM; BF16 was 3-4x the file on a GPU before session 55); a compressed-tensors
    / GPTQ / AWQ checkpoint's integer weights alike on a CPU (CompressedConfig.cpu_storage), and
    on a GPU FP8 where that holds its 4-bit values exactly (CompressedConfig.fp8_rows)."""
    gguf = _gguf_default(model, load_format, dtype, device)
    if gguf is not None:
        return gguf
    cfg = None
    if load_format != "random" and dtype == "auto" and not isinstance(model, ModelConfig):
        cfg = peek_config(model, load_format)
        c = cfg.compressed
        cpu = str(device).startswith("cpu")
        if c is not None and cfg.quantization is None and (cpu or c.fp8_rows):  # (FP8 stays)
            # CPU: int4 / int8 keep the stored codes; GPU: 4-bit values exactly in FP8
            quant = c.cpu_storage if cpu else "fp8"
            log.info("%s holds %s weights: loading them as %s (pass --dtype or --quantization "
                     "to choose)", model, c.kind, quant)  # fmt: skip
            return quant
    if default_quantization(dtype, device, None, "bfloat16") is None:
        return None
    cfg = cfg or peek_config(model, load_format)  # (read once)
    return default_quantization(dtype, device, None, cfg.dtype)


def local_model(source):
    """An Ollama model (`ollama:NAME`) or a Hub GGUF repository (`USER/REPO-GGUF:QUANT`) as its
    local GGUF file (model_source.py), its vision tower (when it has one and no `--mmproj`
    named another) registered for it; any other source unchanged."""
    if not needs_resolving(source):
        return source
    src = local(source)
    if src.mmproj is not None:
        from qwen35.gguf_checkpoint import find_mmproj, use_mmproj

        if find_mmproj(Path(src.path)) is None:
            use_mmproj(src.path, src.mmproj)
    return src.path


def _gguf_default(model: str, load_format: str, dtype: str, device) -> str | None:
    if load_format == "random" or dtype != "auto":
        return None
    from qwen35.gguf_checkpoint import POINTER, pointer_info

    path = Path(str(model)).expanduser()
    if not is_gguf_file(path) and not (path / POINTER).is_file():
        return None

    quant = pointer_info(resolve_model_dir(path)).get("default_quantization")
    if quant is not None:
        log.info("%s holds quantized weights: loading them as %s (pass --dtype or "
                 "--quantization to choose)", path.name, quant)  # fmt: skip
    return quant


def _bf16_storage(model, quantization, dtype, device, report: LoadReport | None = None):
    """quantization "bf16": the weights are allocated in bf16 on the meta model (quant/apply.py
    bf16_storage_meta) and nothing is quantized after loading (returns None); else unchanged."""
    if quantization != "bf16":
        return quantization
    if device.type != "cpu":
        raise Qwen35Error(
            "--quantization bf16 (fp32 compute on bf16-stored weights) is for CPUs without native "
            "bf16; on a GPU run --dtype bf16"
        )
    if dtype != torch.float32:
        raise Qwen35Error(
            f"--quantization bf16 stores the weights in bf16 for an fp32 model (--dtype fp32); "
            f"with --dtype {_name(dtype)} drop it (the weights are then {_name(dtype)} already)"
        )
    from qwen35.quant.apply import bf16_storage_meta

    n = bf16_storage_meta(model, dtype)
    model.quantization = "bf16"  # (as quantize_model_ marks its formats)
    if report is not None:
        report.notes.append(f"bf16 storage: {n} weight tensors in bf16, fp32 compute")
    return None


def _quantize_on_read(model, cfg, quantization, dtype, device, vocab: bool):
    """A QuantizeOnRead for `quantization` (fp8 / int8 / int4 in memory), else None."""
    if quantization not in ("fp8", "int8", "int4"):
        return None
    from qwen35.quant.apply import QuantizeOnRead

    _tie(model, cfg)  # (materialize ties too; the deferred tensors are found after it)
    return QuantizeOnRead(model, cfg, quantization, dtype, device,
                          lambda p: allocate(p, dtype, device), vocab)  # fmt: skip


available_memory = heap.available_memory  # (a module name here: tests replace it)


def _warn_if_short_of_memory(model, cfg, dtype, device, on_read, defer: set[int], tp,
                             files: list[Path] | None = None) -> None:  # fmt: skip
    """Before any weight is read on a CPU: warn when loading needs more than the machine has
    available (the OS would kill the process minutes in, without a message), with the
    `--quantization` that needs less. Needed: what materialize allocates, or under int8 / int4
    the plan's load peak (plan/cpu.py: the quantized model + its largest module in BF16; a GGUF
    file's tensors as the loader keeps them, plan/gguf.py)."""
    if device.type != "cpu" or tp.size > 1:  # (ranks share one machine: the engine's business)
        return
    free = available_memory()
    if free is None:
        return
    from qwen35.plan.cpu import largest_module_bytes, load_peak_bytes

    fmt = on_read.fmt if on_read is not None else None
    kept = fmt in ("int8", "int4") and files and is_gguf_file(files[0]) and on_read.take_hints
    if kept:  # the file's own storage (groups of 32, int8 for Q6_K, ...): plan/gguf.py
        from qwen35.plan import gguf as plan_gguf
        from qwen35.plan.params import text_tensors

        held = plan_gguf.bytes_of(plan_gguf.load(str(files[0])), text_tensors(cfg))
        need = load_peak_bytes(cfg, fmt, held)
    elif fmt in ("int8", "int4"):
        need = load_peak_bytes(cfg, fmt)
    else:  # as allocated (fp8 in memory: ~1 byte a deferred weight, one module in BF16)
        need = sum(p.numel() if id(p) in defer else allocate_bytes(p, dtype)
                   for p in model.parameters())  # fmt: skip
        need += largest_module_bytes(cfg) if defer else 0
    if need <= free:
        return
    advice = ""
    if fmt != "int4":
        advice = (f"; --quantization int4 needs about {load_peak_bytes(cfg, 'int4') / 2**30:.1f} "
                  "GiB (`qwen35 plan --dtype int4`)")  # fmt: skip
    elif kept:
        advice = (f"; --gguf-int4 requantize (every matrix in int4 groups of 128 again) needs "
                  f"about {load_peak_bytes(cfg, 'int4') / 2**30:.1f} GiB")  # fmt: skip
    log.warning(
        "loading %s needs about %.1f GiB of memory and %.1f GiB is available: the system may "
        "kill the process while it loads%s",
        cfg.name, need / 2**30, free / 2**30, advice,
    )  # fmt: skip


def _deferred(on_read) -> set[int]:
    return on_read.deferred() if on_read is not None else frozenset()


def _finish_reading(on_read, report: LoadReport) -> None:
    if on_read is not None:
        on_read.finish()
        report.notes.append(
            f"quantized to {on_read.fmt} while reading ({len(on_read.left)} modules; at most "
            f"{on_read.peak / 2**20:.0f} of {on_read.allocated / 2**20:.0f} MiB of unquantized "
            "weights at once)"
        )


def _unquantized_in_bf16(cfg, quantization, dtype, device, files: list[Path] | None) -> bool:
    """Whether a quantized model computing in fp32 on a CPU (`--dtype auto` where the CPU has no
    native bf16, or `--dtype fp32`) keeps the weights that stay unquantized (embeddings,
    lm_head, routers, in_proj_a / b, the vision tower; all of them under FP8) in bf16
    (_narrow_unquantized): where the checkpoint stores them in BF16 (a BF16 checkpoint, an
    official FP8 one: the embedding table's dtype in the headers of `files`, read only here;
    random weights, files None: the config's dtype). They are the checkpoint's own values, so
    nothing is rounded, and the model's memory is the planner's figure for the format (BF16
    besides the quantized tensors) instead of twice that for those tensors (the 0.8B's FP8
    model: 1.41 -> 0.94 GiB). Only where our GEMV kernel reads bf16 weights for fp32 rows (else
    every decode step would widen them first); `--quantization bf16` narrows every weight
    itself (_bf16_storage)."""
    from qwen35.devices import _bf16_rows_kernel, stored_as_bf16

    quantized = quantization in ("fp8", "int8", "int4") or (
        cfg.quantization is not None and quantization != "bf16"
    )
    if not (quantized and device.type == "cpu" and dtype == torch.float32):
        return False
    stored = (files and stored_embedding_dtype(files)) or cfg.dtype
    return stored_as_bf16(stored) and _bf16_rows_kernel()


def _narrow_unquantized(model, dtype, report: LoadReport | None = None) -> None:
    """The plain weights of the meta model allocated in bf16 (quant/apply.py bf16_storage_meta,
    as `--quantization bf16` does); the quantized modules are swapped in after."""
    from qwen35.quant.apply import bf16_storage_meta

    n = bf16_storage_meta(model, dtype)
    if report is not None:
        report.notes.append(f"{n} unquantized weight tensors stored in bf16, fp32 compute")


def _check_mtp(cfg: ModelConfig, mtp: bool) -> None:
    if mtp and cfg.mtp_num_hidden_layers < 1:
        raise Qwen35Error(
            f"{cfg.name}'s config has no MTP head (mtp_num_hidden_layers is 0): speculative "
            "decoding drafts with it; run without --num-speculative-tokens"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_fp8(cfg: ModelConfig, quantization: str | None) -> bool:
    """Random weights stored in FP8: asked for, or an FP8 config kept as it is."""
    return quantization == "fp8" or (cfg.quantization is not None and quantization is None)


def check_parallel_layout(cfg: ModelConfig, tp: int, ep: int, quantization: str | None) -> None:
    """Refuse a tensor-parallel layout the weights cannot be split into, before any is read:
    the planner's rules (plan.sharding), with FP8's whole scale blocks when FP8 weights are
    read (an FP8 checkpoint, whatever it is quantized to next) or made (quantization="fp8")."""
    from qwen35.plan.sharding import validate_layout

    fp8 = cfg.quantization is not None or quantization == "fp8"
    validate_layout(cfg, tp, ep, "fp8" if fp8 else "bf16")


def _check_layout(cfg: ModelConfig, tp: TensorParallel, factory, quantization) -> None:
    if tp.size == 1:
        return
    if factory is not None:
        raise Qwen35Error("a custom model_factory cannot be loaded tensor-parallel")
    check_parallel_layout(cfg, tp.size, tp.ep_size, quantization)


def _zero_padding(params: dict[str, torch.Tensor], cfg: ModelConfig, tp: TensorParallel) -> None:
    if tp.size > 1:
        from qwen35.parallel.loading import zero_vocab_padding

        zero_vocab_padding(params, cfg, tp)


def _finish(model: nn.Module, cfg: ModelConfig) -> None:
    post = getattr(model, "post_load", None)
    if callable(post):
        post()
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise Qwen35Error(
            f"buffers left on the meta device after loading: {meta[:5]}; the model factory runs "
            'under torch.device("meta"): build buffers on a real device (with torch.device("cpu"))'
        )
    model.eval()
    model.requires_grad_(False)


# ---- construction -------------------------------------------------------------------------------
def _default_factory(
    cfg: ModelConfig, tp: TensorParallel = SINGLE, vision: bool = False, mtp: bool = False
):
    from qwen35.models.qwen3_5 import Qwen35ForCausalLM

    return Qwen35ForCausalLM(cfg, device=torch.device("meta"), tp=tp, vision=vision, mtp=mtp)


def _scan_against(model: nn.Module, cfg: ModelConfig, files: list[Path], directory: Path):
    """Every header of `files` matched to `model`'s (meta) parameters, the stored FP8 modules
    turned FP8 first; reads no tensor data. Returns (the scan, the FP8 module names); a missing,
    unexpected or mis-shaped tensor is a CheckpointError naming them."""
    fp8_names: list[str] = []
    if cfg.quantization is not None:  # block FP8: the stored FP8 modules stay FP8
        from qwen35.quant.apply import fp8_modules_in_checkpoint, swap_to_fp8_meta

        fp8_names = swap_to_fp8_meta(model, fp8_modules_in_checkpoint(cfg, files), cfg)
    canonical, aliases = _canonical(model)
    s = scan_headers(files, canonical, aliases)
    if s.missing or s.unexpected or s.mismatched:
        raise mismatch_error(str(directory), cfg, s)
    return s, fp8_names


def check_checkpoint(directory: str | Path) -> tuple[ModelConfig, list[Path]]:
    """A model directory's config and weight files, checked against each other as loading
    checks them (headers only: every tensor present, no stranger, each shape, dtype and FP8
    scale right; the vision tower when the checkpoint stores one; `mtp.*` not checked).
    Returns (config, safetensors files)."""
    directory = Path(directory)
    cfg = ModelConfig.from_hf(directory)
    files = checkpoint_files(directory)
    vision = cfg.vision is not None and _has_visual_tensors(directory)
    model, _ = build_model(cfg, None, None, None, vision=vision)
    _scan_against(model, cfg, files, directory)
    return cfg, files


def _has_visual_tensors(source) -> bool:
    """Whether the checkpoint stores a vision tower (headers only)."""
    try:
        files = checkpoint_files(resolve_model_dir(source))
    except Qwen35Error:
        return False  # load_model reports the real problem
    for f in files:
        with open_safetensors(f) as h:
            if any(k.startswith("model.visual.") for k in h.keys()):
                return True
    if files and all(is_gguf_file(f) for f in files):
        log.info("%s: no vision tower (llama.cpp keeps it in an mmproj*.gguf file; put the one "
                 "for this model beside it, or name it with --mmproj, for images): text only",
                 source)  # fmt: skip
    else:
        log.warning("%s has no vision tower (model.visual.*): loading it text only", source)
    return False


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype | None,
    device: torch.device | None,
    factory: ModelFactory | None = None,
    tp: TensorParallel = SINGLE,
    vision: bool = False,
    mtp: bool = False,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Construct on the meta device; allocate parameters in dtype/device unless dtype is None.
    vision: with the (unsharded) vision tower, also under tensor parallelism (default model).
    mtp: with the MTP head (default model)."""
    with torch.device("meta"):  # tensors the factory creates without a device land on meta
        model = factory(cfg) if factory is not None else _default_factory(cfg, tp, vision, mtp)
    _tie(model, cfg)  # before any name scan: a tied lm_head is an alias, not a parameter
    if dtype is None:
        return model, {}
    return model, materialize(model, cfg, dtype, device)


def _canonical(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters by first name, and aliases (tied names) -> first name."""
    params: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
            params[name] = p
    return params, aliases


def _tie(model: nn.Module, cfg: ModelConfig) -> None:
    """Share the embedding with lm_head when the config ties them and the module did not."""
    if not cfg.tie_word_embeddings:
        return
    try:
        head, emb = model.get_submodule("lm_head"), model.get_submodule("model.embed_tokens")
    except AttributeError:
        return
    if getattr(head, "weight", None) is not None and head.weight is not emb.weight:
        head.weight = emb.weight


def _allocated_dtype(p: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """What materialize allocates meta parameter p in: dtype, unless it is quantized storage
    (integer, or marked keep_dtype), which keeps its own."""
    own = not p.is_floating_point() or getattr(p, "keep_dtype", False)
    return p.dtype if own else dtype


def allocate(p: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised parameter for meta parameter p (dtype: _allocated_dtype) on device."""
    dt = _allocated_dtype(p, dtype)
    return nn.Parameter(torch.empty(p.shape, dtype=dt, device=device), False)


def allocate_bytes(p: torch.Tensor, dtype: torch.dtype) -> int:
    return p.numel() * _allocated_dtype(p, dtype).itemsize


def materialize(
    model: nn.Module,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    defer: set[int] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Replace meta parameters by uninitialised ones in dtype on device; move buffers there.
    Parameters whose id is in `defer` stay on meta (QuantizeOnRead allocates them one module at
    a time).

    Returns the canonical parameter map (tied parameters once) for filling."""
    _tie(model, cfg)
    new: dict[int, nn.Parameter] = {}
    keep = []  # keeps the meta parameters alive so their ids stay unique during the walk
    _allocate_pack_groups(model, dtype, device, defer, new, keep)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or id(p) in defer:
                continue
            q = new.get(id(p))
            if q is None:
                keep.append(p)
                q = new[id(p)] = allocate(p, dtype, device)
            mod._parameters[name] = q
        for name, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[name] = b.to(device)  # keep the buffer's own dtype (fp32 inv_freq)
    return _canonical(model)[0]


def _allocate_pack_groups(model: nn.Module, dtype, device, defer, new: dict, keep: list) -> None:
    """The weights each module's pack() packs (`pack_groups`: q/k/v, DeltaNet's in_proj,
    gate/up, a MoE block's router group) allocated as row slices of one tensor, so that
    post_load's pack_linears finds them laid out and copies nothing (it was a torch.cat of most
    of the model's bytes at every start: ~1-4 s of a 4B's). Groups with a deferred, tied,
    non-meta or differently typed weight are left to materialize (pack() copies those)."""
    from qwen35.layers.linear import Linear

    seen: set[int] = set()
    for mod in model.modules():
        for lins, rows_multiple in getattr(mod, "pack_groups", lambda: [])():
            ps = [lin.weight for lin in lins]
            if (any(type(lin) is not Linear for lin in lins) or any(id(p) in seen for p in ps)
                    or any(id(p) in defer or not p.is_meta or p.dim() != 2 for p in ps)):  # fmt: skip
                continue
            seen.update(id(p) for p in ps)
            dts = {_allocated_dtype(p, dtype) for p in ps}
            if len(dts) != 1 or len({p.shape[1] for p in ps}) != 1 or len(set(map(id, ps))) < len(ps):
                continue
            n = sum(p.shape[0] for p in ps)
            base = torch.empty(n + (-n % rows_multiple), ps[0].shape[1], dtype=dts.pop(), device=device)
            row = 0
            for p in ps:
                keep.append(p)
                new[id(p)] = nn.Parameter(base[row : row + p.shape[0]], False)
                row += p.shape[0]


# ---- random weights -----------------------------------------------------------------------------
def init_random_(params: dict[str, torch.Tensor], seed: int = 0, on_read=None) -> None:
    """Sane random values for benchmarks: N(0, 0.02) matrices, zero-centred norms at 0, the
    gated norm at 1, A_log = log U(1, 16), dt_bias = 1 (as transformers' init); FP8 matrices
    N(0, 1) in e4m3 with every block scale 0.02. on_read: a QuantizeOnRead (deferred parameters
    allocated and filled in turn, the same values in the same order)."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in params.items():
            if p.is_meta and on_read is not None:
                p = on_read.allocate(name)
            g = gens.get(p.device)
            if g is None:
                g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("_scale_inv"):
                p.fill_(0.02)  # FP8 block scales: W = q * 0.02 with q ~ N(0, 1)
            elif p.dtype == torch.float8_e4m3fn:
                for i in range(p.shape[0] if p.dim() == 3 else 1):  # an expert at a time
                    dst = p[i] if p.dim() == 3 else p
                    dst.copy_(torch.empty(dst.shape, device=p.device).normal_(generator=g))
            elif name.startswith("model.visual.") and ("norm" in name or name.endswith("bias")):
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)  # LayerNorm
            elif name.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)  # gated RMSNorm multiplies by w, not 1 + w
            elif name.endswith(("norm.weight", "layernorm.weight")):
                p.zero_()  # zero-centred RMSNorm: scale 1 + w
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape, device=p.device).uniform_(1, 16, generator=g).log_())
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            else:
                _normal_(p, g)
            if on_read is not None:
                del p  # (the module's last BF16 tensor: freed when it is quantized)
                on_read.written(name)


RANDOM_CHUNK = 1 << 22  # values drawn a task by _normal_


def _normal_(p: torch.Tensor, g: torch.Generator) -> None:
    """p ~ N(0, 0.02), seeded by g. A large CPU tensor is drawn in chunks of RANDOM_CHUNK values,
    each from its own generator seeded from one draw of g, on torch's threads (a seeded normal_
    runs on one core: ~180 M values a second, most of a random 35B-A3B's load); the values
    depend on the seed and the chunk size, not on the number of threads."""
    if not p.is_cpu or p.numel() < 2 * RANDOM_CHUNK or not p.is_contiguous():
        p.normal_(0.0, 0.02, generator=g)
        return
    from concurrent.futures import ThreadPoolExecutor

    base = int(torch.randint(0, 2**62, (1,), generator=g))
    flat = p.view(-1)
    inference = torch.is_inference_mode_enabled()  # (thread-local: the pool's threads take it
    # from here, or a tensor made under inference mode cannot be written from them)

    def draw(i: int) -> None:
        gi = torch.Generator().manual_seed(base + i)
        with torch.inference_mode(inference):
            flat[i * RANDOM_CHUNK : (i + 1) * RANDOM_CHUNK].normal_(0.0, 0.02, generator=gi)

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(draw, range(-(-flat.numel() // RANDOM_CHUNK))))


def _random_config(source: str | Path | ModelConfig) -> tuple[ModelConfig, Path | None]:
    """The config for random weights, and the directory it came from (if any)."""
    if isinstance(source, ModelConfig):
        return source, None
    path = Path(source).expanduser()
    if path.exists():
        return ModelConfig.from_hf(path), path if path.is_dir() else path.parent
    from qwen35.catalog import load_model_config

    return load_model_config(str(source)), None


# ---- where the files are ------------------------------------------------------------------------
def resolve_model_dir(source: str | Path) -> Path:
    """A local model directory for a path, a config.json/safetensors file, or a Hub id."""
    if isinstance(source, ModelConfig):
        raise Qwen35Error("a ModelConfig has no weights; pass load_format='random'")
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if is_gguf_file(path):
            from qwen35.gguf_checkpoint import model_dir

            return model_dir(path)
        if path.suffix in (".json", ".safetensors"):
            return path.parent
        raise CheckpointError(f"{path} is a file; pass the model directory that contains it")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _from_hub(text)
    from qwen35.catalog import resolve_name

    try:
        name = resolve_name(text)
    except ConfigError:
        raise CheckpointError(
            f"no model directory at {text!r} (not a directory, a config.json, or a Hub id like "
            "Qwen/Qwen3.5-0.8B); for random weights of a catalog model use load_format='random' "
            "(CLI: --load-format random)"
        ) from None
    return _from_hub(f"Qwen/{name}")  # a catalog name: its official repository


def _from_hub(repo_id: str, kind: str = "model") -> Path:
    """The local snapshot of a Hub repository (a model; kind names it in errors, e.g. "adapter"):
    the cache first, a download only when online."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} looks like a Hub id but huggingface_hub is not installed; pass a "
            f"local {kind} directory instead"
        ) from None
    cache = hub_cache_dir()
    fetch = f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`)"
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True, cache_dir=cache
            )
        )
    except Exception:  # LocalEntryNotFoundError and friends: not (fully) cached
        pass
    where = f"no local directory {repo_id!r}, and as a Hub id it is not in " + (
        cache or "the Hugging Face cache"
    )
    if hub_offline():
        raise CheckpointError(
            f"{where} (HF_HUB_OFFLINE is set); fetch it first "
            f"with {fetch}, or pass a local {kind} directory"
        )
    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache))
    except Exception as e:
        raise CheckpointError(
            f"{where} and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); fetch it with "
            f"{fetch} where the Hub is reachable, or pass a local {kind} directory"
        ) from None
