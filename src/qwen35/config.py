"""Model configuration: one frozen dataclass parsed from a Hugging Face `config.json`.

`ModelConfig.from_hf` accepts the official nested VLM layout (`text_config`, `vision_config`,
`quantization_config`) and the flat text-only layout that transformers' `Qwen3_5ForCausalLM`
saves. It fails with `ConfigError` naming the key when a required value is missing or wrong.
No torch here: the planner imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen35.errors import Qwen35Error, shown

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
LAYER_KINDS = ("linear_attention", "full_attention")
_VISION_TOKEN_KEYS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"
)  # fmt: skip


class ConfigError(Qwen35Error, ValueError):
    """A config that cannot be read as a Qwen 3.5 model; the message names the key."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    # the prompt's vision tokens (top-level keys of the official config.json)
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (`rope_parameters.rope_type: "yarn"`): Qwen's recipe past the native
    262,144 tokens is factor 4 over original_max_position_embeddings 262,144 (~1M tokens).
    The frequencies are transformers' `_compute_yarn_parameters` (layers/rotary.py)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # scales cos / sin; None: from factor (and mscales)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @property
    def max_context(self) -> int:
        """The context it extends to (as vLLM: original length x factor)."""
        return int(self.original_max_position_embeddings * self.factor)

    def cos_sin_scale(self) -> float:
        """The factor on cos / sin (transformers' attention_factor)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)


def parse_yarn(rope: dict, max_position_embeddings: int, where: str = "rope_parameters") -> Yarn:
    """A `rope_type: "yarn"` dict -> Yarn, or ConfigError naming the key."""

    def num(key: str, default=None, lo: float | None = None):
        v = rope.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (lo is not None and v < lo):
            bound = f" >= {lo:g}" if lo is not None else ""
            raise ConfigError(f"'{where}.{key}' must be a number{bound}, got {v!r}")
        return float(v)

    factor = num("factor", lo=1.0)
    if factor is None:
        raise ConfigError(f"'{where}.factor' is required for rope_type 'yarn' (e.g. 4.0)")
    original = num("original_max_position_embeddings", max_position_embeddings, lo=1)
    return Yarn(
        factor=factor,
        original_max_position_embeddings=int(original),
        beta_fast=num("beta_fast") or 32.0,  # (0 / None: the default, as transformers)
        beta_slow=num("beta_slow") or 1.0,
        attention_factor=num("attention_factor", lo=0.0),
        mscale=num("mscale"),
        mscale_all_dim=num("mscale_all_dim"),
        truncate=bool(rope.get("truncate", True)),
    )


ROPE_TYPES = ("default", "yarn")
QWEN_YARN_FACTOR = 4  # Qwen's long-context recipe: 262,144 -> 1,048,576 tokens


def check_yarn_factor(factor) -> float:
    """A `--yarn` factor (engine option, ModelConfig.with_yarn) as a float, or ConfigError."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 < factor < 1e6:
        raise ConfigError(
            f"--yarn must be a factor > 1 (Qwen's recipe: {QWEN_YARN_FACTOR}), got {factor!r}"
        )
    return float(factor)


@dataclass(frozen=True)
class QuantConfig:
    quant_method: str  # "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompressedScheme:
    """One config group of a compressed-tensors checkpoint (llm-compressor's format): how the
    weights of the modules its `targets` name are stored."""

    targets: tuple[str, ...]
    type: str  # "int" | "float"
    num_bits: int  # int: 4 or 8; float: 8 (e4m3)
    strategy: str  # "group" | "channel" | "tensor" | "block"
    group_size: int | None = None
    symmetric: bool = True
    activations: str | None = None  # what the checkpoint asks of the inputs (not applied)


@dataclass(frozen=True)
class CompressedConfig:
    """`quantization_config` with quant_method "compressed-tensors" (RedHatAI's Qwen3.5
    quantized.w4a16 / w8a8 / FP8-dynamic releases, llm-compressor's AWQ / GPTQ exports), read
    by compressed_tensors.py, or "gptq" / "awq" (format "gptq", "gptq_v2", "awq"), read by
    gptq_awq.py; the weights' layout is told by each module's tensors."""

    format: str
    schemes: tuple[CompressedScheme, ...]
    ignore: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """What wrote it, for messages: "GPTQ", "AWQ" or "compressed-tensors"."""
        return {"gptq": "GPTQ", "gptq_v2": "GPTQ", "awq": "AWQ"}.get(self.format,
                                                                      "compressed-tensors")

    @property
    def fp8_rows(self) -> int | None:
        """The inputs of the FP8 blocks of one row that hold the weights exactly (the GPU's
        storage of them: loader.auto_quantization), else None: 4-bit integers in groups of 32,
        64 (that) or 128k inputs or per channel (128), each (u - z) an integer of at most 15
        (exact in e4m3) times its group's scale."""
        ints = [s for s in self.schemes if s.type == "int"]
        if not ints or any(s.num_bits != 4 for s in ints):
            return None
        widths = set()
        for s in ints:
            g = s.group_size if s.strategy == "group" else None  # (channel, tensor: one a row)
            if g is None or g % 128 == 0:
                widths.add(128)
            elif g in (32, 64):
                widths.add(g)
            else:
                return None
        return widths.pop() if len(widths) == 1 else None

    @property
    def cpu_storage(self) -> str:
        """The CPU weight format that holds the stored integers (loader.auto_quantization): int4
        where a scheme stores 4-bit ones (8-bit ones are then held as int8 beside them), else
        int8. (FP8 weights are kept FP8: ModelConfig.quantization.)"""
        return "int4" if any(s.type == "int" and s.num_bits == 4 for s in self.schemes) else "int8"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # FFN: dense (intermediate_size > 0) or MoE (num_experts > 0)
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # misc
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    max_position_embeddings: int = 262_144  # with YaRN: the context it extends to
    yarn: Yarn | None = None  # RoPE scaling past the native context (rope_type "yarn")
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    mtp_num_hidden_layers: int = 0
    dtype: str = "bfloat16"
    mamba_ssm_dtype: str = "float32"
    vision: VisionConfig | None = None
    quantization: QuantConfig | None = None
    compressed: CompressedConfig | None = None  # a compressed-tensors checkpoint's scheme

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_full_attention_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def num_linear_attention_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def linear_key_dim(self) -> int:  # Kd = nk * dk
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:  # Vd = nv * dv
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:  # C = 2*Kd + Vd, channels of the causal conv
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def native_context(self) -> int:
        """The context the model was trained for (YaRN's original length, else the maximum)."""
        return self.yarn.original_max_position_embeddings if self.yarn else self.max_position_embeddings

    def rope_parameters(self) -> dict:
        """The text config's `rope_parameters` as config.json writes them (transformers, vLLM /
        SGLang overrides)."""
        rope = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": list(self.mrope_section),
            "mrope_interleaved": True,
        }
        if self.yarn is not None:
            y = self.yarn
            rope.update(rope_type="yarn", factor=y.factor,
                        original_max_position_embeddings=y.original_max_position_embeddings)  # fmt: skip
            if (y.beta_fast, y.beta_slow, y.truncate) != (32.0, 1.0, True):
                rope.update(beta_fast=y.beta_fast, beta_slow=y.beta_slow, truncate=y.truncate)
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(y, key) is not None:
                    rope[key] = getattr(y, key)
        return rope

    def yarn_advice(self, tokens: int) -> str:
        """What lets `tokens` positions past this model's maximum run (the planner's and the
        engine's refusals end with it)."""
        top = self.max_position_embeddings
        if self.yarn is not None:
            return (
                f"YaRN factor {self.yarn.factor:g} (native {self.native_context:,}); a larger "
                "--yarn extends it, past what the model was tuned for"
            )
        q = QWEN_YARN_FACTOR
        if tokens <= q * top:
            return f"YaRN extends it (RoPE scaling): add --yarn {q} (Qwen's recipe, up to {q * top:,} tokens)"
        return (
            f"YaRN extends it (RoPE scaling): --yarn {math.ceil(tokens / top)} would allow it, "
            f"beyond Qwen's recipe (--yarn {q}, up to {q * top:,} tokens)"
        )

    def with_yarn(self, factor: float) -> ModelConfig:
        """This model with YaRN RoPE scaling by `factor` over its native context (`--yarn`;
        Qwen's recipe: 4 over 262,144 tokens), as its model card's rope_parameters edit does; a
        config with YaRN already keeps its other YaRN parameters."""
        factor = check_yarn_factor(factor)
        yarn = (
            dataclasses.replace(self.yarn, factor=factor)
            if self.yarn
            else Yarn(factor, self.max_position_embeddings)
        )
        return dataclasses.replace(
            self, yarn=yarn, max_position_embeddings=max(self.native_context, yarn.max_context)
        )

    # ---- constructors ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | Path, name: str | None = None) -> ModelConfig:
        """Parse a config.json dict, a path to config.json, or a model directory."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(
                    f"no config file at {path}: pass a config.json or a model directory"
                )
            try:
                raw = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if name is None:
                name = path.parent.name if path.name == "config.json" else path.stem
        else:
            raw = source
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        try:
            return _parse(raw, name or "custom")
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            # a value of the wrong kind that no check below names (the checks name their field)
            raise ConfigError(
                f"the config of {name or 'custom'} has a value of the wrong type or range "
                f"({type(e).__name__}: {shown(e)}); fix config.json or re-download it"
            ) from None


def non_negative_int(v: object) -> bool:
    """An int >= 0 that is not a bool (JSON's true would pass isinstance(v, int))."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# The largest value a config size may take: far past any Qwen 3.5 model (a 10**12 in a damaged
# config would otherwise build 10**12 layer modules, or allocate for them, before any check).
_MAX_SIZE = 1 << 24
_MAX_COUNT = {"num_hidden_layers": 1024, "mtp_num_hidden_layers": 64, "depth": 1024}


def _at_most(field: str, val: int) -> int:
    top = _MAX_COUNT.get(field.rsplit(".", 1)[-1], _MAX_SIZE)
    if isinstance(val, int) and val > top:
        raise ConfigError(f"'{field}' is {val:,}: beyond anything this engine can build "
                          f"(at most {top:,}); fix config.json")  # fmt: skip
    return val


def _parse(raw: dict[str, Any], name: str) -> ModelConfig:
    top_type = raw.get("model_type")
    text = raw.get("text_config")
    if text is None:
        text = raw  # flat text-only layout (Qwen3_5ForCausalLM.save_pretrained)
    elif not isinstance(text, dict):
        raise ConfigError("'text_config' must be an object")
    model_type = text.get("model_type", top_type)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"'model_type' is {model_type!r}; qwen35 reads Qwen 3.5 checkpoints "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )

    def req(key: str, typ: type = int) -> Any:
        if key not in text:
            raise ConfigError(f"missing required key 'text_config.{key}' in config of {name}")
        val = text[key]
        if typ is int and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
            raise ConfigError(f"'text_config.{key}' must be a positive integer, got {val!r}")
        if typ is int:
            _at_most(f"text_config.{key}", val)
        if typ is float and (isinstance(val, bool) or not isinstance(val, (int, float))):
            raise ConfigError(f"'text_config.{key}' must be a number, got {val!r}")
        return val

    def opt_num(key: str, default: float, where: dict | None = None, top: float = math.inf):
        """A finite number in (0, top]: text_config[key] (or where[key]), else default."""
        src = text if where is None else where
        val = src.get(key, default)
        if val is None:
            return default
        if (
            isinstance(val, bool)
            or not isinstance(val, (int, float))
            or not 0 < val <= top
            or not math.isfinite(val)
        ):
            rng = "a positive number" if top == math.inf else f"a number in (0, {top:g}]"
            raise ConfigError(f"'text_config.{key}' must be {rng}, got {val!r}")
        return float(val)

    def opt_int(key: str, default: int) -> int:
        val = text.get(key, default)
        if val is None:
            return default
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ConfigError(f"'text_config.{key}' must be a non-negative integer, got {val!r}")
        return _at_most(f"text_config.{key}", val)

    num_layers = req("num_hidden_layers")
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = opt_int("full_attention_interval", 4) or 4
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(num_layers)
        ]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(
            f"'text_config.layer_types' must list {num_layers} entries (num_hidden_layers), "
            f"got {len(layer_types) if isinstance(layer_types, list) else layer_types!r}"
        )
    bad = sorted({t for t in layer_types if t not in LAYER_KINDS})
    if bad:
        raise ConfigError(
            f"'text_config.layer_types' has unknown kinds {bad}; known: {LAYER_KINDS}"
        )

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError("'text_config.rope_parameters' must be an object")
    rope_theta = opt_num("rope_theta", opt_num("rope_theta", 10_000_000.0), rope)
    prf = opt_num("partial_rotary_factor", opt_num("partial_rotary_factor", 0.25), rope, 1.0)
    mrope = rope.get("mrope_section") or (11, 11, 10)
    if not isinstance(mrope, (list, tuple)) or not all(non_negative_int(m) for m in mrope):
        raise ConfigError(
            f"'text_config.rope_parameters.mrope_section' must list non-negative integers, "
            f"got {mrope!r}"
        )
    mrope = tuple(mrope)
    max_pos = opt_int("max_position_embeddings", 262_144) or 262_144
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "mrope":  # older VL configs' name for the plain (multimodal) RoPE
        rope_type = "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"'text_config.rope_parameters.rope_type' {rope_type!r} is not supported: qwen35 "
            f"runs {' and '.join(repr(t) for t in ROPE_TYPES)} (Qwen's long-context recipe); "
            "fix config.json or use --yarn FACTOR"
        )
    yarn = parse_yarn(rope, max_pos, "text_config.rope_parameters") if rope_type == "yarn" else None
    if yarn is not None:  # the context YaRN extends to (vLLM derives its max length so)
        max_pos = max(max_pos, yarn.max_context)

    # (a dense config may say num_experts 0, as some writers of flat text configs do)
    is_moe = "moe" in model_type or bool(text.get("num_experts"))
    moe: dict[str, int] = {}
    if is_moe:
        moe = {
            "num_experts": req("num_experts"),
            "num_experts_per_tok": req("num_experts_per_tok"),
            "moe_intermediate_size": req("moe_intermediate_size"),
            "shared_expert_intermediate_size": opt_int("shared_expert_intermediate_size", 0),
        }
        if moe["num_experts_per_tok"] > moe["num_experts"]:
            raise ConfigError("'text_config.num_experts_per_tok' exceeds 'num_experts'")
        intermediate = 0
    else:
        intermediate = req("intermediate_size")

    nh = req("num_attention_heads")
    nkv = opt_int("num_key_value_heads", nh) or nh
    if nh % nkv:
        raise ConfigError(
            f"'num_attention_heads' ({nh}) must be a multiple of 'num_key_value_heads' ({nkv})"
        )
    nk = req("linear_num_key_heads")
    nv = req("linear_num_value_heads")
    if nv % nk:
        raise ConfigError(
            f"'linear_num_value_heads' ({nv}) must be a multiple of 'linear_num_key_heads' ({nk})"
        )

    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(non_negative_int(i) for i in eos_ids):
        raise ConfigError(f"'eos_token_id' must be a token id or a list of them, got {eos!r}")
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))

    vision = None
    vc = raw.get("vision_config")
    if isinstance(vc, dict):
        try:
            vision = VisionConfig(
                depth=int(vc["depth"]),
                hidden_size=int(vc["hidden_size"]),
                num_heads=int(vc["num_heads"]),
                intermediate_size=int(vc["intermediate_size"]),
                out_hidden_size=int(vc.get("out_hidden_size", text["hidden_size"])),
                patch_size=int(vc.get("patch_size", 16)),
                temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
                in_channels=int(vc.get("in_channels", 3)),
                spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                num_position_embeddings=int(vc.get("num_position_embeddings", 2304)),
                **{k: int(raw[k]) for k in _VISION_TOKEN_KEYS if raw.get(k) is not None},
            )
        except KeyError as e:
            raise ConfigError(f"missing required key 'vision_config.{e.args[0]}'") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"'vision_config' has a value of the wrong type: {shown(e)}") from None
        for f in dataclasses.fields(vision):
            _at_most(f"vision_config.{f.name}", getattr(vision, f.name))
        if min(vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size,
               vision.out_hidden_size, vision.patch_size, vision.temporal_patch_size,
               vision.in_channels, vision.spatial_merge_size) <= 0:  # fmt: skip
            raise ConfigError(f"'vision_config' sizes must be positive integers, got {vision}")

    quant = compressed = None
    qc = raw.get("quantization_config") or text.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        compressed = _compressed_config(qc)
        quant = _compressed_fp8(compressed)
    elif isinstance(qc, dict) and qc.get("quant_method") in ("gptq", "awq"):
        compressed = _gptq_awq_config(qc)
    elif isinstance(qc, dict):
        method = qc.get("quant_method")
        if method != "fp8":
            raise ConfigError(
                f"'quantization_config.quant_method' is {method!r}; the official block 'fp8' "
                "format, llm-compressor's 'compressed-tensors', 'gptq' and 'awq' are understood"
            )
        block = qc.get("weight_block_size") or [128, 128]
        if (
            not isinstance(block, list)
            or len(block) != 2
            or not all(non_negative_int(b) and b > 0 for b in block)
        ):
            raise ConfigError(
                f"'quantization_config.weight_block_size' must be two positive integers "
                f"([128, 128] in the official releases), got {block!r}"
            )
        skip = qc.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
            raise ConfigError(
                f"'quantization_config.modules_to_not_convert' must be a list of module names, got {skip!r}"
            )
        quant = QuantConfig(
            quant_method="fp8",
            fmt=qc.get("fmt", "e4m3"),
            weight_block_size=(int(block[0]), int(block[1])),
            activation_scheme=qc.get("activation_scheme", "dynamic"),
            modules_to_not_convert=tuple(skip),
        )

    return ModelConfig(
        name=name,
        model_type=model_type,
        vocab_size=req("vocab_size"),
        hidden_size=req("hidden_size"),
        num_hidden_layers=num_layers,
        layer_types=tuple(layer_types),
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=opt_int("head_dim", 0) or req("hidden_size") // nh,
        linear_num_key_heads=nk,
        linear_num_value_heads=nv,
        linear_key_head_dim=req("linear_key_head_dim"),
        linear_value_head_dim=req("linear_value_head_dim"),
        linear_conv_kernel_dim=opt_int("linear_conv_kernel_dim", 4) or 4,
        intermediate_size=intermediate,
        rms_norm_eps=opt_num("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        partial_rotary_factor=prf,
        mrope_section=mrope,
        max_position_embeddings=max_pos,
        yarn=yarn,
        tie_word_embeddings=bool(tie),
        eos_token_ids=eos_ids,
        mtp_num_hidden_layers=opt_int("mtp_num_hidden_layers", 0),
        dtype=str(text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        mamba_ssm_dtype=str(text.get("mamba_ssm_dtype", "float32")),
        vision=vision,
        quantization=quant,
        compressed=compressed,
        **moe,
    )


def _compressed_fp8(c: CompressedConfig) -> QuantConfig | None:
    """The FP8 layout a compressed-tensors checkpoint's e4m3 weights are kept in: its 128 x 128
    blocks (the official layout, the scale named `weight_scale`), per group of g inputs as
    blocks of one row and g inputs, per channel / tensor as blocks of one row and 128 inputs
    (each row's scale repeated along it: exact; fp32 scales, 1/32 byte a weight); None without
    FP8 weights. One layout a model: FP8 schemes of several are refused."""
    fp8 = [s for s in c.schemes if s.type == "float"]
    if not fp8:
        return None
    shape = {"block": lambda g: (g, g), "group": lambda g: (1, g)}
    blocks = {shape.get(s.strategy, lambda g: (1, 128))(s.group_size) for s in fp8}
    if len(blocks) > 1:
        raise ConfigError("'quantization_config.config_groups' stores FP8 weights in several "
                          f"layouts ({sorted(blocks)}): one FP8 layout a model is read")
    return QuantConfig(quant_method="fp8", weight_block_size=blocks.pop())


def _gptq_awq_config(qc: dict) -> CompressedConfig:
    """A GPTQ (GPTQModel / AutoGPTQ) or AWQ (AutoAWQ) quantization_config as the scheme it
    stores (read by gptq_awq.py), refused where the layout is not read: widths other than 4 and
    8 bits (AWQ: 4), AWQ's gemv / marlin layouts, GPTQ's marlin / bitblas checkpoint formats,
    groups not a multiple of 32."""
    where, method = "'quantization_config", qc["quant_method"]
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if bits not in ((4,) if method == "awq" else (4, 8)):
        raise ConfigError(f"{where}.bits' is {bits!r}: {method.upper()} weights of "
                          f"{'4' if method == 'awq' else '4 or 8'} bits are read")  # fmt: skip
    fmt = method
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ConfigError(f"{where}.version' is {qc.get('version')!r}: AWQ's 'gemm' layout is "
                          "read (gemv / marlin / exllama ones are not)")  # fmt: skip
    if method == "gptq":
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(f"{where}.checkpoint_format' is {fmt!r}: GPTQ checkpoints in "
                              "'gptq' or 'gptq_v2' format are read")  # fmt: skip
    if not isinstance(group, int) or not (group == -1 or group > 0 and group % 32 == 0):
        raise ConfigError(f"{where}.group_size' must be -1 or a multiple of 32, got {group!r}")
    sym = bool(qc.get("sym", True)) if method == "gptq" else not qc.get("zero_point", True)
    scheme = CompressedScheme(targets=(), type="int", num_bits=bits,
                              strategy="channel" if group == -1 else "group",
                              group_size=None if group == -1 else group, symmetric=sym)  # fmt: skip
    skip = qc.get("modules_to_not_convert") or ()
    return CompressedConfig(format=fmt, schemes=(scheme,), ignore=tuple(map(str, skip)))


_CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized",
               "mixed-precision")  # fmt: skip


def _compressed_config(qc: dict) -> CompressedConfig:
    """compressed-tensors' quantization_config, refused (ConfigError naming the key) where its
    weights are in a form this engine does not read: 4- or 8-bit integers (per group, channel or
    tensor, symmetric or with zero points) and FP8 e4m3 (per channel, tensor or 128 x 128 block)
    are read; NVFP4 / MXFP4, other widths, activation-ordered groups are not."""
    where = "'quantization_config"
    if qc.get("transform_config"):
        raise ConfigError(f"{where}.transform_config' is set: weights rotated by online "
                          "transforms (QuIP / SpinQuant) are not read")  # fmt: skip
    fmt = qc.get("format") or "mixed-precision"  # (absent: each group says, or the tensors)
    if fmt not in _CT_FORMATS or qc.get("sparsity_config"):
        raise ConfigError(
            f"{where}.format' is {fmt!r}: compressed-tensors checkpoints in "
            f"{', '.join(_CT_FORMATS)} are read (NVFP4 / MXFP4 / 2:4-sparse ones are not); "
            "use the BF16 or an FP8 / W4A16 / W8A8 release"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}.config_groups' must name at least one scheme, got {groups!r}")
    schemes = []
    for gname, g in groups.items():
        at = f"{where}.config_groups.{gname}"
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise ConfigError(f"{at}.weights' must describe the weights, got {w!r}")
        kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
        group = w.get("group_size")
        ok = {("int", 4), ("int", 8), ("float", 8)}
        if (kind, bits) not in ok or g.get("format") not in (None, *_CT_FORMATS):
            raise ConfigError(
                f"{at}.weights' is {kind} with {bits} bits ({g.get('format') or fmt}): 4- and "
                "8-bit integer and 8-bit float (e4m3) weights are read; NVFP4 / MXFP4 and other widths "
                "are not"
            )
        if strategy not in ("group", "channel", "tensor", "block"):
            raise ConfigError(f"{at}.weights.strategy' is {strategy!r}: group, channel, tensor "
                              "or block weights are read")  # fmt: skip
        if strategy == "group" and not (isinstance(group, int) and group > 0 and group % 32 == 0):
            raise ConfigError(f"{at}.weights.group_size' must be a multiple of 32, got {group!r}")
        if strategy == "block":
            block = w.get("block_structure")
            if kind != "float" or not (isinstance(block, list) and len(block) == 2
                                       and block[0] == block[1] and block[0] in (64, 128)):
                raise ConfigError(f"{at}.weights.block_structure' is {block!r}: FP8 weights "
                                  "in square blocks of 128 (or 64) are read")  # fmt: skip
            group = block[0]
        act = g.get("input_activations")
        acts = (f"{act.get('type')}{act.get('num_bits')} {act.get('strategy')}"
                if isinstance(act, dict) else None)  # fmt: skip
        targets = g.get("targets") or []
        schemes.append(CompressedScheme(
            targets=tuple(map(str, targets)), type=kind, num_bits=int(bits), strategy=strategy,
            group_size=group if strategy in ("group", "block") else None,
            symmetric=bool(w.get("symmetric", True)), activations=acts))  # fmt: skip
    ignore = qc.get("ignore") or []
    return CompressedConfig(format=fmt, schemes=tuple(schemes), ignore=tuple(map(str, ignore)))
