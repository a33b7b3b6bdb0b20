"""llama.cpp's GGUF files as a checkpoint: `qwen35 serve --model Qwen3.5-9B-Q4_K_M.gguf`.

A GGUF file of the `qwen35` / `qwen35moe` architectures (llama.cpp's `convert_hf_to_gguf.py`,
then `llama-quantize`) holds the text model, its MTP layer, the vocabulary and the chat template,
under llama.cpp's tensor names and with the converter's edits applied; the vision tower is a
separate `mmproj*.gguf` beside the model file (of several, the most precise). Read through the
`gguf` package (llama.cpp's own reader; numpy dequantizers for every ggml type):

- `model_dir(path)`: a small directory in the cache (`QWEN35_CACHE_DIR` or `~/.cache/qwen35/gguf/`,
  made once per file and reused) with the config.json the metadata gives (the VLM layout with a
  tower), the chat template, a tokenizer.json when the vocabulary is not Qwen 3.5's own (the
  bundled one serves it when it is), the files' tensor tables (`tensors.json`: later loads map the
  files without parsing their headers) and `gguf.json` naming the files. The loader takes that
  directory like any other (`weights.checkpoint_files` returns the GGUF files).
- `GGUFCheckpoint(path)`: what `weights.open_safetensors` returns for a `.gguf` file: its tensors
  under the transformers names (`model.layers.N...`, `lm_head.weight`, `mtp.*`, `model.visual.*`)
  and shapes, each read by undoing the converter's edits: norm weights stored as 1 + w (all but
  the gated DeltaNet norm), `ssm_a` as -exp(A_log), the conv kernel squeezed, DeltaNet V heads
  reordered from grouped-by-K-head to tiled order (when value heads outnumber key heads), routed
  experts as separate gate / up tensors, the patch kernel per frame. Quantized tensors (Q8_0,
  Q4_K, ...) are dequantized to fp32 (exact: scale x integer); F32 / F16 / BF16 ones are read as
  stored. `int4_hint(key)` tells int4 how to keep a tensor (its 4-bit lattices, or int8).

The weights then take whatever storage the engine is asked for (`--quantization int8 | int4 |
fp8`, else the dtype); a quantized file with `--dtype auto` on a CPU loads as int4 (files mostly
of 5 bits a weight or fewer: Q4_K_M, Q4_0, IQ4_XS, ...) or int8 (Q5_K_M, Q6_K, Q8_0, ...) so that
its memory stays near the file's (`default_quantization`). These are qwen35's kernels, not
llama.cpp's: logits are close to llama.cpp's on the same file, not equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from qwen35.gguf_header import HeaderReader, Tensor, Unsupported, tensor_view
from qwen35.model_source import file_path, is_gguf_file
from qwen35.quant.formats import Lattice
from qwen35.weights import CheckpointError, PresentedSlice

ARCHS = {"qwen35": False, "qwen35moe": True}  # GGUF architecture -> MoE
POINTER = "gguf.json"  # in a model_dir: the GGUF file(s) it stands for
_DIR_VERSION = 2  # of what a model_dir holds (2: the file's sampling defaults): in its cache key
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
# bits per weight of a file's main type up to which it loads as int4 (else int8)
_INT4_UP_TO_BITS = 5.0


class GGUFError(CheckpointError):
    pass


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError(
            "reading .gguf files needs the `gguf` package (llama.cpp's reader): "
            "pip install 'qwen35[gguf]' (or pip install gguf)"
        ) from None
    return gguf


# ---- files ---------------------------------------------------------------------------------------
def shard_paths(path: Path) -> list[Path]:
    """A GGUF file, or all shards of a split one (`name-00001-of-00003.gguf`: any shard names
    them all); a missing shard is an error naming it."""
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    n = int(m["n"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFError(f"{path.name} is one of {n} shards but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent} "
                        "(incomplete download?)")  # fmt: skip
    return paths


@lru_cache(maxsize=64)
def _reader(path: str):
    """The file's header: gguf_header.HeaderReader (one pass), or for what it leaves
    (big-endian files, nested arrays) the `gguf` package's GGUFReader."""
    gguf = _require_gguf()
    try:
        try:
            return HeaderReader(path)
        except Unsupported:
            return gguf.GGUFReader(path)
    except Exception as e:  # ValueError / struct errors / OSError / UnicodeError on bad files
        raise GGUFError(f"cannot read {path} as GGUF: {e} (truncated or corrupt file?)") from None


def _value(r, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def metadata(path: Path) -> dict:
    """The first shard's key/values, without the vocabulary arrays."""
    r = _reader(str(shard_paths(path)[0]))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores")  # fmt: skip
    return {k: _value(r, k) for k in r.fields if k not in skip and not k.startswith("GGUF.")}


INDEX = "tensors.json"  # in a model_dir: each file's tensor table (_table)
# llama.cpp's converter copies the checkpoint's generation_config.json sampling into these keys
_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
             "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}  # fmt: skip


def sampling_defaults(meta: dict) -> dict:
    """The file's recommended sampling (`general.sampling.*`, which llama.cpp's converter takes
    from the checkpoint's generation_config.json) under generation_config.json's names, float32
    values as written (0.6, not 0.6000000238)."""
    out = {}
    for key, name in _SAMPLING.items():
        v = meta.get(key)
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            out[name] = int(v) if name == "top_k" else float(str(np.float32(v)))
    return out


def _shape(t) -> tuple[int, ...]:
    """A tensor's shape in numpy (row-major) order; GGUF lists it fastest dimension first."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _table(path: Path) -> list[list]:
    """[name, type, shape (ggml order), absolute offset, bytes] per tensor of one file."""
    return [[t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.data_offset),
             int(t.n_bytes)] for t in _reader(str(path)).tensors]  # fmt: skip


def _tables(directory: Path, paths: list[Path]) -> dict[Path, list]:
    """Each file's tensors, from the model_dir's table (no header parsing: the `gguf` reader
    takes ~5 s over a 248K-token vocabulary) or, without one, from the reader."""
    try:
        index = json.loads((directory / INDEX).read_text())
        rows = {p: index[str(p)] for p in paths}
    except (OSError, ValueError, KeyError):
        return {p: list(_reader(str(p)).tensors) for p in paths}
    gguf = _require_gguf()
    out = {}
    for p in paths:
        mm = np.memmap(p, mode="r", dtype=np.uint8)
        out[p] = [Tensor(name, gguf.GGMLQuantizationType[kind], np.array(ne, dtype=np.uint64),
                         tensor_view(mm, kind, ne, offset, nbytes), int(np.prod(ne)), nbytes,
                         offset)  # fmt: skip
                  for name, kind, ne, offset, nbytes in rows[p]]
    return out


# ---- config -------------------------------------------------------------------------------------
def _tensor_shapes(paths: list[Path]) -> dict[str, tuple[int, ...]]:
    out = {}
    for p in paths:
        for t in _reader(str(p)).tensors:
            out[t.name] = _shape(t)
    return out


def hf_config(path: Path) -> dict:
    """The transformers text config (flat, `qwen3_5_text` / `qwen3_5_moe_text`) of a GGUF file,
    from its metadata and tensor shapes."""
    meta = metadata(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(
            f"{path.name} holds a {arch!r} model; qwen35 reads the Qwen 3.5 architectures "
            f"({', '.join(ARCHS)}) of llama.cpp's converter"
        )
    moe = ARCHS[arch]
    shapes = _tensor_shapes(shard_paths(path))

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise GGUFError(f"{path.name}: metadata key {arch}.{key} is missing")
        if isinstance(v, float):  # stored as float32: its shortest decimal (1e-06, not 9.99e-07)
            v = float(str(np.float32(v)))
        return v

    if get("ssm.v_head_reordered", True) is False:  # (Ollama's key: llama.cpp always tiles)
        raise GGUFError(f"{path.name} says its DeltaNet V heads are not tiled "
                        f"({arch}.ssm.v_head_reordered = false), the layout of Qwen3-Next files; "
                        "qwen35 reads Qwen 3.5 files as llama.cpp and Ollama write "
                        "them")  # fmt: skip
    n_mtp = int(get("nextn_predict_layers", 0))
    n_layers = int(get("block_count")) - n_mtp
    recurrent = get("attention.recurrent_layers", required=False)
    if recurrent is not None:
        kinds = ["linear_attention" if r else "full_attention" for r in list(recurrent)[:n_layers]]
    else:
        every = int(get("full_attention_interval", 4))
        kinds = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                 for i in range(n_layers)]  # fmt: skip
    head_dim = int(get("attention.key_length"))
    rope_dim = int(get("rope.dimension_count", head_dim // 4))
    sections = [int(s) for s in get("rope.dimension_sections", [11, 11, 10, 0])]
    while len(sections) > 3 and sections[-1] == 0:
        sections.pop()
    inner = int(get("ssm.inner_size"))
    v_heads = int(get("ssm.time_step_rank"))
    vocab = shapes["token_embd.weight"][0]
    rope = {
        "rope_type": "default",
        "rope_theta": float(get("rope.freq_base", 10_000_000.0)),
        "partial_rotary_factor": rope_dim / head_dim,
        "mrope_section": sections,
        "mrope_interleaved": True,
    }
    if get("rope.scaling.type", required=False) == "yarn":
        rope.update(
            rope_type="yarn",
            factor=float(get("rope.scaling.factor")),
            original_max_position_embeddings=int(get("rope.scaling.original_context_length")),
        )
    cfg = {
        "architectures": ["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "vocab_size": vocab,
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": n_layers,
        "layer_types": kinds,
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "head_dim": head_dim,
        "linear_num_key_heads": int(get("ssm.group_count")),
        "linear_num_value_heads": v_heads,
        "linear_key_head_dim": int(get("ssm.state_size")),
        "linear_value_head_dim": inner // v_heads,
        "linear_conv_kernel_dim": int(get("ssm.conv_kernel")),
        "max_position_embeddings": int(get("context_length", 262_144)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "rope_parameters": rope,
        "mtp_num_hidden_layers": n_mtp,
        "dtype": _stored_dtype(shard_paths(path)),
    }
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        cfg["eos_token_id"] = int(eos)
    if moe:
        cfg.update(
            num_experts=int(get("expert_count")),
            num_experts_per_tok=int(get("expert_used_count")),
            moe_intermediate_size=int(get("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0)),
        )
    else:
        cfg["intermediate_size"] = int(get("feed_forward_length"))
    return cfg


def _types(paths: list[Path]) -> Counter:
    """Weights per ggml type over the 2-D and 3-D tensors."""
    c: Counter = Counter()
    for p in paths:
        for t in _reader(str(p)).tensors:
            if len(t.shape) >= 2:
                c[t.tensor_type.name] += int(t.n_elements)
    return c


def _stored_dtype(paths: list[Path]) -> str:
    """The config dtype `--dtype auto` reads: float32 for an F32 file, bfloat16 otherwise."""
    return "float32" if file_type(paths) == "F32" else "bfloat16"


def file_type(paths: list[Path]) -> str:
    """The most common ggml type of the matrices ("Q4_K", "Q8_0", "BF16", ...)."""
    top = _types(paths).most_common(1)
    return top[0][0] if top else "F32"


def default_quantization(paths: list[Path]) -> str | None:
    """The CPU weight format that keeps a quantized file's memory near its own, from the type
    holding most of its matrix weights: int4 for types of 5 bits a weight or fewer (Q4_K, Q4_0,
    IQ4_XS, Q3_K, ...; a Q4_K_M file's Q6_K tensors go along), int8 for larger ones (Q5_K, Q6_K,
    Q8_0, ...); None for F32 / F16 / BF16 files."""
    gguf = _require_gguf()
    top = file_type(paths)
    if top in ("F32", "F16", "BF16", "F64"):
        return None
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[top]]
    return "int4" if 8 * size / block <= _INT4_UP_TO_BITS else "int8"


# ---- names and the converter's edits ------------------------------------------------------------
_LAYER = {  # llama.cpp name (after blk.N.) -> transformers name (after model.layers.N.)
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_MTP = {  # the MTP layer's own tensors (blk.<num_hidden_layers + j>.nextn.*)
    "nextn.eh_proj.weight": "fc.weight",
    "nextn.enorm.weight": "pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": "norm.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
_EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight")  # -> mlp.experts.gate_up_proj


_VISION = {  # llama.cpp's mmproj name -> transformers name (after model.visual.)
    "attn_qkv": "attn.qkv", "attn_out": "attn.proj", "ffn_up": "mlp.linear_fc1",
    "ffn_down": "mlp.linear_fc2", "ln1": "norm1", "ln2": "norm2",
}  # fmt: skip
_VISION_TOP = {
    "mm.0": "merger.linear_fc1", "mm.2": "merger.linear_fc2", "v.post_ln": "merger.norm",
    "v.patch_embd": "patch_embed.proj", "v.position_embd": "pos_embed",
}  # fmt: skip
_VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>",
                  "vision_end_token_id": "<|vision_end|>"}  # fmt: skip


def _vision_name(name: str) -> str | None:
    m = re.match(r"^v\.blk\.(\d+)\.(\w+)\.(weight|bias)$", name)
    if m is not None and m[2] in _VISION:
        return f"model.visual.blocks.{m[1]}.{_VISION[m[2]]}.{m[3]}"
    base, _, leaf = name.rpartition(".")
    if base in _VISION_TOP and leaf in ("weight", "bias"):
        return f"model.visual.{_VISION_TOP[base]}.{leaf}"
    return None


_EXPLICIT_MMPROJ: dict[Path, Path] = {}  # model file -> the tower `--mmproj` named for it


def is_tower(path: str | Path) -> bool:
    """Whether a checkpoint file is a model's vision tower (read as GGUF whatever its name)."""
    return file_path(path) in _MMPROJ


def use_mmproj(model: str | Path, mmproj: str | Path) -> None:
    """`--mmproj PATH` (llama.cpp's flag): this vision tower for this model file, wherever it is
    (an Ollama blob, another folder), instead of looking beside the file (find_mmproj), for the
    rest of the process."""
    m, t = file_path(model), file_path(mmproj)
    if not is_gguf_file(m):
        raise GGUFError(f"--mmproj {mmproj}: a vision tower file goes with a GGUF model file "
                        f"(--model FILE.gguf), not {model}")  # fmt: skip
    if not t.is_file():
        raise GGUFError(f"--mmproj {mmproj}: no such file")
    arch = _value(_reader(str(t)), "general.architecture")
    if arch != "clip":
        raise GGUFError(f"--mmproj {mmproj} is not a vision tower file (its architecture is "
                        f"{arch!r}, llama.cpp's mmproj files say 'clip')")  # fmt: skip
    _EXPLICIT_MMPROJ[m] = t


def find_mmproj(path: Path) -> Path | None:
    """The vision tower of a model file: the one `--mmproj` named (use_mmproj), else an
    `mmproj*.gguf` beside it (as llama.cpp's `-hf` downloads and LM Studio keep them); of several
    (a repository's F32 / BF16 / F16 copies), the most precise (its matrices' type: F32, BF16,
    F16, then quantized), logged."""
    if (named := _EXPLICIT_MMPROJ.get(file_path(path))) is not None:
        return named
    found = sorted(p for p in path.parent.iterdir()
                   if p.is_file() and p.name.lower().startswith("mmproj")
                   and p.name.lower().endswith(".gguf"))  # fmt: skip
    if len(found) <= 1:
        return found[0] if found else None
    rank = {"F32": 0, "BF16": 1, "F16": 2}
    best = min(found, key=lambda p: (rank.get(file_type([p]), 3), p.name))
    import logging

    logging.getLogger("qwen35.loader").info(
        "%s: vision tower %s (the most precise of %s)", path.name, best.name,
        ", ".join(p.name for p in found))  # fmt: skip
    return best


def vision_config(mmproj: Path, text: dict, tokens: list[str] | None) -> tuple[dict, dict]:
    """(the VLM config.json around a text config, preprocessor_config.json) from an mmproj
    file's `clip.vision.*` metadata; the vision token ids from the vocabulary."""
    meta = metadata(mmproj)
    if meta.get("general.architecture") != "clip" or meta.get("clip.projector_type") not in (
        "qwen3vl_merger", None
    ):
        raise GGUFError(f"{mmproj.name} is not a Qwen 3.5 vision tower (clip, qwen3vl_merger): "
                        f"architecture {meta.get('general.architecture')!r}, projector "
                        f"{meta.get('clip.projector_type')!r}")  # fmt: skip
    if any(meta.get("clip.vision.is_deepstack_layers") or []):
        raise GGUFError(f"{mmproj.name}: a tower with deepstack layers is Qwen3-VL's, not 3.5's")
    shapes = _tensor_shapes([mmproj])

    def get(key):
        v = meta.get(f"clip.vision.{key}")
        if v is None:
            raise GGUFError(f"{mmproj.name}: metadata key clip.vision.{key} is missing")
        return v

    vision = {
        "model_type": "qwen3_5_vision",
        "depth": int(get("block_count")),
        "hidden_size": int(get("embedding_length")),
        "num_heads": int(get("attention.head_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "out_hidden_size": int(get("projection_dim")),
        "patch_size": int(get("patch_size")),
        "temporal_patch_size": 1 + ("v.patch_embd.weight.1" in shapes),
        "in_channels": int(shapes["v.patch_embd.weight"][1]),
        "spatial_merge_size": int(get("spatial_merge_size")),
        "num_position_embeddings": int(shapes["v.position_embd.weight"][0]),
        "hidden_act": "gelu_pytorch_tanh",
    }
    cfg = {
        "architectures": [text["architectures"][0].replace("ForCausalLM",
                                                           "ForConditionalGeneration")],
        "model_type": text["model_type"].removesuffix("_text"),
        "tie_word_embeddings": text["tie_word_embeddings"],
        "text_config": text,
        "vision_config": vision,
    }  # fmt: skip
    if tokens is not None:
        index = {t: i for i, t in enumerate(tokens) if t in _VISION_TOKENS.values()}
        cfg.update({k: index[t] for k, t in _VISION_TOKENS.items() if t in index})
    pre = {"patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
           "merge_size": vision["spatial_merge_size"]}  # fmt: skip
    for key in ("image_mean", "image_std"):
        if meta.get(f"clip.vision.{key}") is not None:
            pre[key] = [float(str(np.float32(x))) for x in meta[f"clip.vision.{key}"]]
    return cfg, pre


class _Layout:
    """What the converter's edits depend on."""

    def __init__(self, cfg: dict):
        self.layers = cfg["num_hidden_layers"]
        self.k_heads = cfg["linear_num_key_heads"]
        self.v_heads = cfg["linear_num_value_heads"]
        self.dk = cfg["linear_key_head_dim"]
        self.dv = cfg["linear_value_head_dim"]

    def untile(self, t: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
        """V heads in tiled order (v0 of every K head, then v1, ...) back to grouped order (every
        V head of K head 0, then of K head 1, ...): the inverse of the converter's reorder."""
        if self.k_heads == self.v_heads:
            return t
        r = self.v_heads // self.k_heads
        shape = list(t.shape)
        dim %= len(shape)
        t = t.reshape(*shape[:dim], r, self.k_heads, head_dim, *shape[dim + 1 :])
        return t.transpose(dim, dim + 1).contiguous().reshape(shape)


def _hf_name(name: str, layout: _Layout) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    if m is None:
        return None
    i, rest = int(m[1]), m[2]
    if i >= layout.layers:  # the MTP layer(s)
        j = i - layout.layers
        if rest in _MTP:
            return f"mtp.{_MTP[rest]}" if j == 0 else None
        inner = _LAYER.get(rest)
        return f"mtp.layers.{j}.{inner}" if inner else None
    inner = _LAYER.get(rest)
    return f"model.layers.{i}.{inner}" if inner else None


def _undo(hf: str, gname: str, t: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """The converter's edit of one tensor, undone (t is fresh: edited in place where it can)."""
    if gname.endswith("norm.weight") and not gname.endswith("ssm_norm.weight"):
        return t.sub_(1)  # stored as 1 + w (the MTP layer's enorm / hnorm too)
    if hf.endswith("linear_attn.A_log"):
        return layout.untile(torch.log(-t.float()).to(t.dtype), 0, 1)
    if hf.endswith(("linear_attn.dt_bias", "in_proj_a.weight", "in_proj_b.weight")):
        return layout.untile(t, 0, 1)  # one value per V head
    if hf.endswith("in_proj_z.weight"):
        return layout.untile(t, 0, layout.dv)
    if hf.endswith("in_proj_qkv.weight") or hf.endswith("conv1d.weight"):
        qk = 2 * layout.k_heads * layout.dk
        t = torch.cat([t[:qk], layout.untile(t[qk:], 0, layout.dv)])
        return t.unsqueeze(1) if hf.endswith("conv1d.weight") else t  # [C, K] -> [C, 1, K]
    if hf.endswith("out_proj.weight"):
        return layout.untile(t, 1, layout.dv)
    return t


# ---- reading ------------------------------------------------------------------------------------
# the types read as stored (safetensors' names are ggml's); the others are dequantized to F32
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# weights dequantized at a time: numpy's temporaries stay in the caches (chunks of 64K ran the
# Q6_K / Q4_K dequantizers at 585 / 620 M weights/s on the Zen 5 VM; 4M ones at 290 / 330, the
# gguf package's own 16-row groups at 286 / 433)
_DEQUANT_CHUNK = 1 << 16
# types dequantized by the gguf package's class for the type on whole chunks (its dequantize
# splits them into 16-row groups and joins the results: a copy); the rest (IQ types: lookup
# grids the package loads first) through its dequantize
_DIRECT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


# 4-bit types whose blocks hold 16-level lattices of 32 values: (block bytes, offset and length
# of the packed 4-bit codes in a block); a tensor of these keeps its values under int4
_LATTICE = {"Q4_0": (18, 2, 16), "Q4_1": (20, 4, 16), "Q4_K": (144, 16, 128)}
_INT8_ABOVE_BITS = 5.0  # quantized types of more bits a weight stay faithful as int8 under int4


def _bits(t) -> float:
    gguf = _require_gguf()
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    return 8 * size / block


def _read(t, codes: int | None = None) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in numpy (row-major) order: F32 / F16 / BF16 as
    stored, anything else dequantized to fp32. codes (a _LATTICE type): every 4-bit code set to
    that value first (0: each lattice's zero point, 1: zero point + step)."""
    shape = _shape(t)
    out = torch.empty(shape, dtype=_read_dtype(t))
    _read_rows(t, 0, out.view(-1, shape[-1]), codes)
    return out


def _read_dtype(t) -> torch.dtype:
    return _TORCH_DTYPES.get(t.tensor_type.name, torch.float32)


def _st_dtype(t) -> str:
    """The safetensors dtype a tensor is presented in."""
    name = t.tensor_type.name
    return name if name in _TORCH_DTYPES else "F32"


def _read_rows(t, first: int, out: torch.Tensor, codes: int | None = None) -> None:
    """Rows first .. first + len(out) of the tensor's [rows, in] view into out [n, in] (a
    contiguous block of _read_dtype(t)): a fused expert tensor is filled expert by expert,
    without a copy of each half."""
    gguf = _require_gguf()
    rows = np.asarray(t.data).reshape(-1, t.data.shape[-1])[first : first + len(out)]
    if codes is not None:
        nbytes, start, length = _LATTICE[t.tensor_type.name]
        blocks = np.array(rows).reshape(-1, nbytes)
        blocks[:, start : start + length] = codes * 0x11
        rows = blocks.reshape(rows.shape)
    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        out.copy_(torch.from_numpy(np.array(rows)))
        return
    if kind == "BF16":
        out.copy_(torch.from_numpy(np.array(rows).view(np.int16)).view(torch.bfloat16))
        return
    step = max(1, _DEQUANT_CHUNK // out.shape[-1])
    direct = getattr(gguf.quants, kind, None) if kind in _DIRECT else None
    for r in range(0, len(rows), step):
        block = np.array(rows[r : r + step])
        part = (direct.dequantize_rows(block) if direct is not None
                else gguf.quants.dequantize(block, t.tensor_type))  # fmt: skip
        out[r : r + step] = torch.from_numpy(part.reshape(-1, out.shape[-1]))


def _block_lattice(t) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 / Q4_K tensor's lattices from its block headers: (step, zero) fp32
    [..., in/32] with value = zero + step * code (Q4_0: d and -8d; Q4_1: d and m; Q4_K: d x
    6-bit scale and -dmin x 6-bit min of each 32-value sub-block)."""
    shape = _shape(t)
    kind = t.tensor_type.name
    nbytes = _LATTICE[kind][0]
    # (torch's ops: its threads, where numpy's took one core; the header bytes copied once)
    head = 16 if kind == "Q4_K" else 4
    b = torch.from_numpy(np.ascontiguousarray(np.asarray(t.data).reshape(-1, nbytes)[:, :head]))

    def half(i: int) -> torch.Tensor:
        return b[:, i : i + 2].contiguous().view(torch.float16).float()

    if kind == "Q4_0":
        step = half(0)
        zero = -8 * step
    elif kind == "Q4_1":
        step, zero = half(0), half(2)
    else:  # Q4_K: 8 sub-blocks of 32 a 256-value super-block, 6-bit scales and mins packed
        d, dmin = half(0), half(2)  # ([blocks, 1] each)
        sc = b[:, 4:16].to(torch.int32)
        scale = torch.empty((len(b), 8), dtype=torch.int32)
        mins = torch.empty((len(b), 8), dtype=torch.int32)
        scale[:, :4], mins[:, :4] = sc[:, 0:4] & 63, sc[:, 4:8] & 63
        scale[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
        mins[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
        step, zero = d * scale, -dmin * mins
    groups = shape[:-1] + (shape[-1] // 32,)
    return step.reshape(groups).contiguous(), zero.reshape(groups).contiguous()


def _block_codes(t) -> torch.Tensor:
    """A Q4_0 / Q4_1 / Q4_K tensor's 4-bit codes in value order, uint8 [..., in] (value = zero
    + step * code with _block_lattice's lattices): each 16-byte (Q4_0 / Q4_1) or 32-byte (Q4_K)
    run of packed bytes holds its run's first half of values in the low nibbles and the second
    half in the high ones."""
    nbytes, start, length = _LATTICE[t.tensor_type.name]
    run = 16 if length == 16 else 32
    qs = np.asarray(t.data).reshape(-1, nbytes)[:, start : start + length].reshape(-1, run)
    qs = torch.from_numpy(np.ascontiguousarray(qs))
    codes = torch.empty((len(qs), 2 * run), dtype=torch.uint8)
    torch.bitwise_and(qs, 15, out=codes[:, :run])  # (torch's threads: numpy's took one core)
    torch.bitwise_right_shift(qs, 4, out=codes[:, run:])
    return codes.reshape(_shape(t))


class GGUFCheckpoint:
    """One GGUF file read as a safetensors file of transformers names (weights.open_safetensors
    returns this for .gguf paths): keys(), get_slice(key), get_tensor(key), a context manager."""

    def __init__(self, path: Path):
        self.path = file_path(path)
        self._sources: dict[str, list[str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self.unknown: list[str] = []
        if is_tower(self.path):  # a model's vision tower
            self._vision(_tables(_MMPROJ[self.path], [self.path])[self.path])
            return
        shards = shard_paths(self.path)
        d = model_dir(shards[0])
        raw = json.loads((d / "config.json").read_text())
        self._layout = _Layout(raw.get("text_config", raw))
        # every shard's tensors (a fused expert tensor's up half may sit in the next shard);
        # keys are presented by the shard that holds their first part
        tables = _tables(d, shards)
        self._tensors = {t.name: t for p in shards for t in tables[p]}
        here = {t.name for t in tables[self.path]}
        for name, t in self._tensors.items():
            if "ffn_up_exps" in name and name.replace("ffn_up_exps", "ffn_gate_exps") in (
                self._tensors
            ):
                if name.replace("ffn_up_exps", "ffn_gate_exps") not in here:
                    continue  # presented with its gate half by that half's shard
            elif name not in here:
                continue
            shape = _shape(t)
            dtype = _st_dtype(t)
            m = re.match(r"^blk\.(\d+)\.(ffn_(?:gate|up)_exps\.weight)$", name)
            if m is not None:  # gate and up: one fused [E, 2I, H] tensor
                i = int(m[1])
                base = f"model.layers.{i}" if i < self._layout.layers else (
                    f"mtp.layers.{i - self._layout.layers}")  # fmt: skip
                key = f"{base}.mlp.experts.gate_up_proj"
                src = self._sources.setdefault(key, [])
                src.append(name)
                src.sort(key=lambda n: _EXPERTS.index(n.split(".", 2)[2]))
                prev = self._shapes.get(key)
                self._shapes[key] = (shape[0], shape[1] * len(src), shape[2])
                if prev is not None and self._dtypes[key] != dtype:
                    dtype = "F32"  # mixed types: both read as fp32
                self._dtypes[key] = dtype
                continue
            key = _hf_name(name, self._layout)
            if key is None:  # presented as it is: the loader's strict scan names it unexpected
                self.unknown.append(name)
                key = name
            if key.endswith("conv1d.weight"):
                shape = (shape[0], 1, shape[1])
            if key.endswith("shared_expert_gate.weight") and len(shape) == 1:
                shape = (1, shape[0])  # llama-quantize drops the leading 1 ([1, H] -> [H])
            if key.endswith("A_log") and dtype != "F32":
                dtype = "F32"
            self._sources[key] = [name]
            self._shapes[key] = shape
            self._dtypes[key] = dtype

    def _vision(self, tensors: list) -> None:
        self._tensors = {t.name: t for t in tensors}
        for name, t in self._tensors.items():
            shape = _shape(t)
            dtype = _st_dtype(t)
            if name == "v.patch_embd.weight.1":
                continue  # the second frame's kernel: stacked with the first
            key = _vision_name(name)
            if key is None:
                self.unknown.append(name)
                key = name
            src = [name]
            if name == "v.patch_embd.weight":  # [C, 3, P, P] per frame -> [C, 3, T, P, P]
                src += ["v.patch_embd.weight.1"] * ("v.patch_embd.weight.1" in self._tensors)
                shape = (shape[0], shape[1], len(src), shape[2], shape[3])
            self._sources[key], self._shapes[key], self._dtypes[key] = src, shape, dtype

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self) -> list[str]:
        return list(self._sources)

    def get_slice(self, key: str) -> PresentedSlice:
        if key not in self._sources:
            raise KeyError(key)
        return PresentedSlice(self, key)

    def int4_kind(self, key: str) -> str | None:
        """What int4_hint gives for this tensor, told without reading it (qwen35 plan counts the
        file's bytes by it): "lattice", "int8" or None."""
        names = self._sources.get(key, [])
        ts = [self._tensors[n] for n in names]
        if not ts or len(self._shapes[key]) < 2 or key.endswith(("embed_tokens.weight",
                                                                  "lm_head.weight")):  # fmt: skip
            return None
        if {t.tensor_type.name for t in ts} <= set(_LATTICE) and self._shapes[key][-1] % 32 == 0:
            # out_proj: whole heads of dv columns move (undone by groups: dv / 32 of them)
            return None if key.endswith("out_proj.weight") and self._layout.dv % 32 else "lattice"
        if any(t.tensor_type.name not in _TORCH_DTYPES and _bits(t) > _INT8_ABOVE_BITS
               for t in ts):  # fmt: skip
            return "int8"
        return None

    hint_formats = ("int4",)  # the storage quant_hint speaks to (weights.read_into)

    def quant_hint(self, key: str):
        """int4_hint, under the name weights.read_into asks any checkpoint for."""
        return self.int4_hint(key)

    def int4_hint(self, key: str):
        """How int4 should hold this matrix (quant/apply.py _int_linear): for Q4_0 / Q4_1 / Q4_K
        tensors their 4-bit lattices and codes (step, zero [..., in/32] fp32, codes [..., in]
        uint8; value = zero + step * code), so that neither the values need be read nor the
        codes found again; "int8" for quantized types of more than 5 bits a weight (a Q4_K_M
        file's Q6_K tensors); else None (int4 groups)."""
        kind = self.int4_kind(key)
        if kind != "lattice":
            return kind
        names = self._sources[key]
        parts = [(*_block_lattice(self._tensors[n]), _block_codes(self._tensors[n]))
                 for n in names]  # fmt: skip
        step, zero, codes = (torch.cat([p[i] for p in parts], dim=1) if len(parts) > 1
                             else parts[0][i] for i in range(3))  # fmt: skip
        codes = _undo(key, names[0], codes, self._layout)  # (out_proj: whole heads of dv columns)
        if key.endswith("out_proj.weight"):  # the lattices: dv / 32 groups a head
            return Lattice(*(self._layout.untile(x, 1, self._layout.dv // 32)
                             for x in (step, zero)), codes)  # fmt: skip
        return Lattice(*(_undo(key, names[0], x, self._layout) for x in (step, zero)), codes)

    def lattice_reference(self, key: str):
        """int4_hint's lattices found the plain way (tests): the tensor read with every 4-bit
        code set to 0 (the zero points) and to 1 (plus the steps), edits undone as for the
        values; None where a group of 32 is not one lattice."""
        zero = self.get_tensor(key, codes=0).float()
        step = self.get_tensor(key, codes=1).float() - zero
        groups = zero.shape[:-1] + (zero.shape[-1] // 32, 32)
        z, st = zero.reshape(groups), step.reshape(groups)
        if not (torch.equal(z, z[..., :1].expand(groups))
                and torch.equal(st, st[..., :1].expand(groups))):  # fmt: skip
            return None
        return st[..., 0].contiguous(), z[..., 0].contiguous()

    def get_tensor(self, key: str, codes: int | None = None) -> torch.Tensor:
        """The tensor under its transformers name and shape, edits undone (codes: _read's)."""
        names = self._sources[key]
        if key.endswith("mlp.experts.gate_up_proj") and len(names) == 2:
            return self._fused(names, codes)
        parts = [_read(self._tensors[n], codes) for n in names]
        if key.startswith("model.visual."):
            t = torch.stack(parts, dim=2) if key.endswith("patch_embed.proj.weight") else parts[0]
            return t.to(_TORCH_DTYPES[self._dtypes[key]])
        t = parts[0]
        if key.endswith("shared_expert_gate.weight"):
            t = t.reshape(self._shapes[key])
        t = _undo(key, names[0], t, self._layout)
        return t.to(_TORCH_DTYPES[self._dtypes[key]])

    def _fused(self, names: list[str], codes: int | None) -> torch.Tensor:
        """gate [E, I, H] and up [E, I, H] as [E, 2I, H], each expert's halves read into place
        (a 35B-A3B layer: 2 GB in fp32, where reading both then concatenating held 4)."""
        gate, up = (self._tensors[n] for n in names)
        E, I, H = _shape(gate)
        dtypes = {_read_dtype(gate), _read_dtype(up)}
        out = torch.empty(E, 2 * I, H, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
        for e in range(E):
            for half, t in enumerate((gate, up)):
                dst = out[e, half * I : (half + 1) * I]
                if _read_dtype(t) == out.dtype:
                    _read_rows(t, e * I, dst, codes)
                else:  # mixed types: through a block of the half's own dtype
                    tmp = torch.empty(I, H, dtype=_read_dtype(t))
                    _read_rows(t, e * I, tmp, codes)
                    dst.copy_(tmp)
        return out


# ---- the model directory ------------------------------------------------------------------------
def cache_root() -> Path:
    base = os.environ.get("QWEN35_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "qwen35"
    return root / "gguf"


_MMPROJ: dict[Path, Path] = {}  # a vision tower file -> the model_dir it belongs to (pointed)


def pointed(directory: Path) -> list[Path] | None:
    """The GGUF files a model_dir stands for, the vision tower's last (None for an ordinary
    directory)."""
    p = directory / POINTER
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
        files = [Path(f) for f in info["files"]]
        if info.get("mmproj"):
            files.append(Path(info["mmproj"]))
            _MMPROJ[files[-1]] = directory
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GGUFError(f"{p} is not a valid GGUF pointer ({e!r}); delete {directory}") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise GGUFError(f"{directory} stands for {', '.join(missing)}, which no longer "
                        f"exist{'s' if len(missing) == 1 else ''}; pass the .gguf file "
                        "again")  # fmt: skip
    return files


def model_dir(path: str | Path) -> Path:
    """The model directory (config, chat template, tokenizer; see the module doc) of a GGUF
    file, made in the cache on first use (written to a temporary name, then renamed)."""
    path = file_path(path)
    if not path.is_file():
        raise GGUFError(f"no GGUF file at {path}")
    paths = shard_paths(path)
    mmproj = find_mmproj(paths[0])
    every = paths + [mmproj] * (mmproj is not None)
    st = [p.stat() for p in every]
    key = hashlib.sha256(json.dumps(
        [_DIR_VERSION, [[str(p), s.st_size, s.st_mtime_ns] for p, s in zip(every, st, strict=True)]]
    ).encode()).hexdigest()[:16]  # fmt: skip
    stem = _SPLIT.sub(r"\g<stem>", paths[0].name).removesuffix(".gguf")
    out = cache_root() / key / stem  # (named as the file: the model's name in logs and tables)
    if (out / POINTER).is_file():
        return out
    cfg = hf_config(paths[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if mmproj is not None:
            tokens = _value(_reader(str(paths[0])), "tokenizer.ggml.tokens")
            full, pre = vision_config(mmproj, cfg, tokens)
            (tmp / "config.json").write_text(json.dumps(full, indent=2))
            (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        else:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        meta = metadata(paths[0])
        template = meta.get("tokenizer.chat_template")
        if isinstance(template, str) and template.strip():
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        tok = _tokenizer_files(paths[0])
        sampling = sampling_defaults(meta)
        if sampling:  # the request defaults (generation_config.py), beside any stop ids
            gen = json.loads(tok.get("generation_config.json", "{}"))
            tok["generation_config.json"] = json.dumps({**gen, **sampling})
        for name, text in tok.items():
            (tmp / name).write_text(text, encoding="utf-8")
        info = {"files": [str(p) for p in paths], "file_type": file_type(paths),
                "default_quantization": default_quantization(paths),
                "mmproj": str(mmproj) if mmproj else None}  # fmt: skip
        (tmp / INDEX).write_text(json.dumps({str(p): _table(p) for p in every}))
        (tmp / POINTER).write_text(json.dumps(info, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # made meanwhile by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def pointer_info(directory: Path) -> dict:
    try:
        return json.loads((directory / POINTER).read_text())
    except (OSError, ValueError):
        return {}


# ---- the vocabulary -----------------------------------------------------------------------------
def _tokenizer_files(path: Path) -> dict[str, str]:
    """{} when the file's vocabulary is Qwen 3.5's own (the bundled one serves it), else a
    tokenizer.json built from the file's BPE vocabulary and a generation_config.json with its
    stop ids."""
    r = _reader(str(path))
    model = _value(r, "tokenizer.ggml.model")
    tokens = _value(r, "tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path.name} has no vocabulary (tokenizer.ggml.tokens)")
    if _is_qwen35_vocab(tokens):
        return {}
    if model != "gpt2":
        raise GGUFError(
            f"{path.name}'s vocabulary is a {model!r} tokenizer that is not Qwen 3.5's; "
            "qwen35 rebuilds byte-level BPE ('gpt2') vocabularies only"
        )
    merges = _value(r, "tokenizer.ggml.merges") or []
    types = _value(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    files = _bpe_tokenizer(list(tokens), list(merges), list(types))
    eos = [_value(r, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    eos = sorted({int(i) for i in eos if i is not None})
    if eos:  # the stop tokens (the bundled vocabulary's defaults do not apply)
        files["generation_config.json"] = json.dumps({"eos_token_id": eos})
    return files


def _is_qwen35_vocab(tokens) -> bool:
    from qwen35.tokenizer import _builtin_backend

    try:
        ref = _builtin_backend()  # (cached: the engine's tokenizer then reuses it)
    except ImportError:
        return False
    n = max([ref.n_vocab - 1, *ref.added.values()]) + 1
    if len(tokens) < n:
        return False
    for i in range(n):
        want = ref.id_to_token(i)
        if want is not None and tokens[i] != want:
            return False
    return True


# Qwen 3.5's pre-tokenizer split (the official tokenizer.json's)
_PRE_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bpe_tokenizer(tokens: list[str], merges: list[str], types: list[int]) -> dict[str, str]:
    """tokenizer.json for a GGUF byte-level BPE vocabulary: BPE over the regular tokens, control
    and user-defined tokens as added tokens (control ones special)."""
    vocab = {}
    added = []
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ in (_CONTROL, _USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False,
                          "special": typ == _CONTROL})  # fmt: skip
        if tok not in vocab:  # added tokens too: `tokenizers` takes their ids from the vocab
            vocab[tok] = i
    pairs = [m.split(" ", 1) for m in merges]
    # a merge of tokens the vocabulary lacks would make `tokenizers` abort: left out
    pairs = [p for p in pairs if len(p) == 2 and p[0] in vocab and p[1] in vocab
             and p[0] + p[1] in vocab]  # fmt: skip
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _PRE_SPLIT}, "behavior": "Isolated",
                 "invert": False},  # fmt: skip
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False},  # fmt: skip
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},  # fmt: skip
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": pairs,
        },
    }
    return {"tokenizer.json": json.dumps(tj, ensure_ascii=False)}
