"""`EngineConfig`: every engine option in one frozen object, built once.

Parts (vLLM-style): `load` (which weights, how), `cache` (KV blocks, state slots, prefix cache,
memory), `scheduler` (batching limits), `parallel` (ranks), `device` (where, threads, CPU runtime
settings). `LLM(model, **kwargs)` and the CLI both go through `EngineConfig.create`, and the CLI's
engine flags are generated from the field metadata here (`add_cli_arguments` / `from_cli`), so a
new option is declared once. No torch import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path

from qwen35.cache_spec import MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS
from qwen35.config import check_yarn_factor
from qwen35.errors import Qwen35Error

MAX_SCHEDULER_STEPS = 16  # decode steps per scheduling round (num_scheduler_steps)
GGUF_INT4 = ("keep", "requantize")  # --gguf-int4 (gguf_checkpoint.GGUFCheckpoint.int4_hint)
INT4_ACTIVATIONS = ("int8", "16bit")  # --int4-activations (quant/layers.py set_int4_activations)


def json_object(text: str) -> dict:
    """A flag's JSON object (argparse type): a clear usage error for anything else."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object {{...}} is needed, got {text!r}")
    return value


def _opt(default, help: str, **cli):
    """A field with its CLI help; `cli` may carry `choices`, `type`, `flag`, `value_aliases`
    (other names of choices: vLLM's dtype names) or `cli=False`."""
    return field(default=default, metadata={"help": help, **cli})


# vLLM's (and torch's) dtype names -> this engine's, for --dtype / --kv-cache-dtype /
# --mamba-ssm-cache-dtype and LLM(dtype="bfloat16")
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
               "float": "fp32"}  # fmt: skip


@dataclass(frozen=True)
class LoadConfig:
    model: str = ""  # set by EngineConfig.create
    dtype: str = _opt(
        "auto",
        "weights and compute dtype (auto: bf16 on a GPU or a CPU with native bf16 - AMX / "
        "AVX512-BF16 - else fp32 compute, on bf16-stored weights when the checkpoint is BF16)",
        choices=["auto", "bf16", "fp16", "fp32"],
        value_aliases=DTYPE_NAMES,
    )
    load_format: str = _opt(
        "auto",
        "'random': random weights from the config (benchmarks only)",
        choices=["auto", "safetensors", "random"],
    )
    quantization: str | None = _opt(
        None,
        "quantize the weights at load: int8 / int4 (weight-only: CPU decode; on a GPU int4 "
        "holds a model in about a third of BF16's memory, read by Triton GEMVs) or fp8 (block "
        "FP8 as the official releases); bf16 with --dtype fp32: weights stored in bf16, fp32 "
        "compute (CPUs without native bf16); default: as stored (FP8 checkpoints stay FP8; "
        "vLLM's 'compressed-tensors' means that too)",
        choices=["fp8", "int8", "int4", "bf16"],
        value_aliases={"compressed-tensors": None},
    )
    int4_activations: str = _opt(
        "int8",
        "int4 weights' decode rows (up to 16) on the CPU: int8 rounds the activations to 8 bits "
        "per 32 inputs for integer dot products (faster; llama.cpp's q4_0 does the same), 16bit "
        "keeps them at bf16 (AVX512-BF16 CPUs) or 16-bit integers (others): weight-only int4. "
        "Process-wide (quant/layers.py Int4Linear.x8)",
        choices=list(INT4_ACTIVATIONS),
    )
    mmproj: str | None = _opt(
        None,
        "a GGUF model's vision tower file (llama.cpp's --mmproj), wherever it is; default: an "
        "mmproj*.gguf beside the model file",
    )
    gguf_int4: str = _opt(
        "keep",
        "a GGUF file loaded as int4: keep (its Q4_0 / Q4_1 / Q4_K tensors keep the file's values "
        "as int4 groups of 32, its 5-8 bit tensors become int8) or requantize (every matrix "
        "requantized to int4 groups of 128: faster decode, a second 4-bit rounding)",
        choices=list(GGUF_INT4),
    )
    yarn: float | None = _opt(
        None,
        "YaRN RoPE scaling by this factor past the checkpoint's native context (Qwen's recipe: "
        "4 -> 1,048,576 tokens, as its model card's rope_parameters edit; a checkpoint whose "
        "config has YaRN uses it without this); can cost quality on short texts",
        type=float,
        metavar="FACTOR",
    )
    chat_template: str | None = _opt(
        None,
        "a jinja chat template used instead of the checkpoint's: a file (e.g. a fixed "
        "chat_template.jinja) or the template text (vLLM's --chat-template)",
        metavar="TEMPLATE",
    )
    generation_config: str = _opt(
        "auto",
        "request defaults for temperature / top_p / top_k / min_p / repetition_penalty: 'auto' "
        "takes the checkpoint's generation_config.json (as vLLM), 'none' OpenAI's (temperature "
        "1, no top-k; vLLM's 'vllm' is taken as 'none'); a request's own values always win",
        choices=["auto", "none"],
        value_aliases={"vllm": "none"},
    )
    override_generation_config: dict | None = _opt(
        None,
        "request defaults over --generation-config's (vLLM's flag), a JSON object: e.g. "
        '\'{"temperature": 0.7, "top_p": 0.8, "presence_penalty": 1.5}\' (temperature, top_p, '
        "top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty); a request's "
        "own values always win",
        type=json_object,
        metavar="JSON",
    )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _opt(16, "tokens per KV block")
    max_memory: str | None = _opt(
        None,
        "memory for weights + caches + working memory, e.g. 8GiB (CPU default: 2 GiB of caches)",
    )
    kv_cache_dtype: str = _opt(
        "auto",
        "dtype of the full-attention layers' K/V cache (auto: the model's compute dtype, but "
        "bf16 for fp32 compute on a CPU over weights stored below fp32, as --dtype auto runs "
        "on CPUs without native bf16); an fp32 model on a CPU may keep it in bf16 or fp16: "
        "half the memory, and half the bytes a long context reads per decoded token; fp8 (e4m3, "
        "unscaled, saturating at +-448, as vLLM's fp8 without calibrated scales) under any "
        "model: half a bf16 cache's memory again, a little accuracy (README \"FP8 KV cache\")",
        choices=["auto", "bf16", "fp16", "fp32", "fp8"],
        value_aliases={**DTYPE_NAMES, "fp8_e4m3": "fp8"},
    )
    mamba_ssm_cache_dtype: str = _opt(
        "auto",
        "dtype of the Gated DeltaNet recurrent states (auto: the checkpoint's mamba_ssm_dtype, "
        "fp32); bf16 halves them (vLLM's --mamba-ssm-cache-dtype, SGLang's --mamba-ssm-dtype): "
        "more sequences in the same memory, each step's state rounded to bf16 (README \"State "
        "dtype\")",
        choices=["auto", "fp32", "bf16"],
        value_aliases={"float32": "fp32", "float": "fp32", "bfloat16": "bf16"},
    )
    enable_prefix_caching: bool = _opt(True, "turn prefix caching off", flag="--no-prefix-caching")
    prefix_cache_memory: str | None = _opt(
        None,
        "memory for prefix-cache DeltaNet state checkpoints (default: a quarter of the cache budget)",
    )
    checkpoint_interval: int | None = _opt(
        None, "tokens between prefix-cache state checkpoints (default about 256)", cli=False
    )
    prefix_cache_dir: str | None = _opt(
        None,
        "a folder where prompt prefixes outlive the engine: prompts of at least "
        "--prefix-cache-dir-min-tokens leave their KV + DeltaNet state checkpoints there (at the "
        "prompt's end, where requests share a prefix, every ~1,024 tokens), and a later engine "
        "of the same model and numerics starts a prompt that extends one from there (README "
        "\"Prefix cache on disk\"); off by default",
        metavar="DIR",
    )
    prefix_cache_dir_size: str = _opt(
        "10GiB", "most disk --prefix-cache-dir takes (least recently used files removed first)"
    )
    prefix_cache_dir_min_tokens: int = _opt(
        256, "shortest prompt prefix --prefix-cache-dir stores (tokens; shorter ones are cheap "
        "to compute again)"
    )
    num_kv_blocks: int | None = _opt(None, "exact KV pool size (tests, experiments)", cli=False)


@dataclass(frozen=True)
class SchedulingConfig:
    max_model_len: int | None = _opt(
        None, "longest prompt + output (default: what the cache holds)"
    )
    max_num_seqs: int = _opt(32, "most sequences running at once")
    max_num_batched_tokens: int = _opt(2048, "token budget per step")
    short_prompt_tokens: int = _opt(
        1024,
        "with --max-decode-step-ms on, prompts of up to this many tokens are short: they start "
        "beside a long prompt's chunk (in shares ahead of it) instead of after its last; vLLM's "
        "--long-prefill-token-threshold (also accepted) draws the same line. 0: only prompts "
        "that fit whole beside the chunk",
        aliases=["--long-prefill-token-threshold"],
    )
    max_decode_step_ms: float | None = _opt(
        None,
        "while sequences are decoding, cut prompt chunks (on 64-token boundaries, at least 128 "
        "tokens) so a step takes about this long at the prefill rate the engine measures: "
        "streams in flight keep getting tokens while a long prompt prefills (on a CPU a "
        "2,048-token chunk takes seconds); with it on, short prompts (--short-prompt-tokens) "
        "also go ahead of a long prompt's chunk instead of after its last. Default: 1000 "
        "under `qwen35 serve`, off elsewhere "
        "(offline batches keep whole chunks: more throughput, and a schedule of token counts "
        "alone, so the same requests give the same tokens). 0: off",
        type=float,
        metavar="MS",
    )
    scheduling_policy: str = _opt(
        "fcfs",
        "which waiting request runs next: 'fcfs' (arrival order) or 'priority' (each request's "
        "`priority`, lower first, then arrival; when the cache runs out, the running sequence "
        "of the lowest priority is preempted first)",
        choices=["fcfs", "priority"],
    )
    num_speculative_tokens: int = _opt(
        0,
        "speculative decoding: tokens the checkpoint's MTP head drafts per decode step, "
        "verified in the same forward (0: off; 1 .. 5; same tokens, fewer steps when "
        "drafts are accepted)",
        choices=list(range(MAX_SPECULATIVE_TOKENS + 1)),
    )
    speculative_method: str = _opt(
        "mtp",
        "where drafts come from: the checkpoint's MTP head, or 'ngram' (prompt lookup: the tokens "
        "that followed the last earlier occurrence of the text's final n-gram; no model, no MTP "
        "weights needed: for outputs that copy their input, e.g. edits, extraction, RAG)",
        choices=list(SPECULATIVE_METHODS),
    )
    prompt_lookup_max: int = _opt(4, "ngram drafts: the longest n-gram matched")
    prompt_lookup_min: int = _opt(2, "ngram drafts: the shortest n-gram matched")
    num_scheduler_steps: int = _opt(
        1,
        "decode steps run back to back per scheduling round, each fed the tokens the last one "
        "sampled on the device (vLLM's multi-step scheduling): the host schedules, builds the "
        "batch and reads tokens once per k tokens instead of every token, so a GPU waits on "
        "Python k times less often; tokens stream k at a time, and a sequence that stops mid-way "
        "wastes the rest of its k. Rows with logprobs, penalties, logit bias, allowed / bad "
        "words, a grammar or pending min_tokens, and steps with prefill chunks, run one step. "
        "1: off",
        choices=list(range(1, MAX_SCHEDULER_STEPS + 1)),
    )
    speculative_adaptive: bool = _opt(
        False,
        "speculative decoding, k > 1: draft only as many of the k tokens a step as measured step "
        "times and acceptance make worth it (experimental: not reliably faster than k drafts "
        "every step on a noisy machine)",
    )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = _opt(
        1,
        "tensor-parallel ranks: one node starts them itself (one per GPU, or sharing the CPU "
        "cores); several nodes: start every rank with torchrun (see README)",
        aliases=["-tp"],
    )
    enable_expert_parallel: bool = _opt(
        False, "MoE: spread the routed experts whole over the tensor-parallel ranks"
    )
    distributed_timeout: int = _opt(
        600, "seconds a collective between ranks may wait before it fails"
    )


@dataclass(frozen=True)
class DeviceConfig:
    device: str = _opt("cpu", "cpu, cuda or cuda:N")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")
    enforce_eager: bool = _opt(False, "GPU: no CUDA graphs for decode steps (every step eager)")
    # models/head_screen.py: greedy / top-k rows read an int8 copy of lm_head, then a few rows
    head_screen: bool = _opt(
        True,
        "CPU: greedy and top-k requests read the whole fp32 / bf16 lm_head each token, not its "
        "int8 screen (which saves vocab x hidden bytes of memory)",
        flag="--no-head-screen",
    )
    # flush denormals, keep freed memory in the heap (see engine/runtime.py)
    configure_runtime: bool = _opt(
        True, "leave the process's CPU runtime settings alone", flag="--no-configure-runtime"
    )


@dataclass(frozen=True)
class MultimodalConfig:
    text_only: bool = _opt(
        False, "skip the vision tower: no images or videos, no tower memory", flag="--text-only"
    )
    # most images / videos per prompt; {"image": 0, "video": 0} is the same as text_only
    limit_mm_per_prompt: dict | None = _opt(None, "items per prompt (default 16 each)", cli=False)
    allowed_media_domains: str | None = _opt(
        None, "comma-separated domains whose http(s) image URLs may be fetched (default: none)"
    )
    max_media_bytes: int = _opt(32 << 20, "largest image / video accepted, in bytes", cli=False)
    media_fetch_timeout: float = _opt(10.0, "seconds for one media URL fetch", cli=False)
    max_num_encoder_tokens: int | None = _opt(
        None,
        "vision tokens encoded per step beyond the first item (default max-num-batched-tokens)",
        cli=False,
    )

    def __post_init__(self) -> None:
        lim = self.limit_mm_per_prompt
        if lim is not None and (
            not isinstance(lim, dict)
            or set(lim) - {"image", "video"}
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in lim.values())
        ):
            raise Qwen35Error(
                'limit_mm_per_prompt must look like {"image": 4, "video": 1} (counts >= 0), '
                f"got {lim!r}"
            )
        n = self.max_num_encoder_tokens
        if n is not None and (not isinstance(n, int) or n < 1):
            raise Qwen35Error(f"max_num_encoder_tokens must be an integer >= 1, got {n!r}")

    @property
    def vision_disabled(self) -> bool:
        lim = self.limit_mm_per_prompt
        return self.text_only or (lim is not None and not any(lim.values()))


@dataclass(frozen=True)
class LoraConfig:
    # name -> PEFT adapter directory; the CLI's NAME=PATH items (vLLM's --lora-modules)
    lora_modules: dict | None = _opt(
        None,
        "LoRA adapters served next to the base model, as NAME=PATH (PEFT directories): a "
        "request whose `model` is NAME runs with that adapter; several may share one batch",
        nargs="+",
        metavar="NAME=PATH",
    )
    enable_lora: bool = _opt(
        False,
        "accept LoRA adapters loaded at run time (LLMEngine.add_lora; the server's "
        "/v1/load_lora_adapter); implied by --lora-modules",
    )
    max_loras: int = _opt(8, "most LoRA adapters loaded at once")
    max_lora_rank: int = _opt(
        16,
        "GPU: the largest adapter rank served (adapters are stacked into max-loras x "
        "max-lora-rank slots allocated at start, which CUDA graphs read); CPUs: no limit",
    )
    # stacked slots (layers/lora.py LoraSlots) or one LoraDelta per adapter; None: stacked on a GPU
    lora_stacked: bool | None = _opt(None, "LoRA slots stacked (tests)", cli=False)

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise Qwen35Error(f"{name} must be an integer >= 1, got {v!r}")
        mods = self.lora_modules
        if mods is None:
            return
        if isinstance(mods, (list, tuple)):
            pairs = {}
            for item in mods:
                name, path = parse_lora_module(item)
                if name in pairs:
                    raise Qwen35Error(f"--lora-modules names {name!r} twice")
                pairs[name] = path
            object.__setattr__(self, "lora_modules", pairs)
        elif not isinstance(mods, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in mods.items()
        ):
            raise Qwen35Error(
                'lora_modules must map names to adapter directories, e.g. {"sql": "/adapters/sql"}'
            )
        if len(self.lora_modules) > self.max_loras:
            raise Qwen35Error(
                f"{len(self.lora_modules)} adapters in lora_modules but max_loras is "
                f"{self.max_loras}: raise --max-loras"
            )

    @property
    def enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)


def parse_lora_module(item) -> tuple[str, str]:
    """One --lora-modules item: NAME=PATH, or vLLM's JSON {"name": ..., "path": ...}."""
    text = str(item).strip()
    if text.startswith("{"):
        import json

        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise Qwen35Error(f"--lora-modules item {text!r} is not valid JSON ({e})") from None
        name, path = (d.get("name"), d.get("path")) if isinstance(d, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(path, str):
            raise Qwen35Error(
                f'--lora-modules JSON items need "name" and "path" strings, got {text!r}'
            )
    else:
        name, eq, path = text.partition("=")
        if not eq:
            name = ""
    if not name.strip() or not path.strip():
        raise Qwen35Error(
            f"--lora-modules takes NAME=PATH items (e.g. sql=/adapters/sql, or a Hub id for "
            f'PATH) or JSON {{"name": ..., "path": ...}}, got {item!r}'
        )
    return name.strip(), path.strip()


_PARTS = {
    "load": LoadConfig,
    "cache": CacheConfig,
    "scheduler": SchedulingConfig,
    "parallel": ParallelConfig,
    "device": DeviceConfig,
    "multimodal": MultimodalConfig,
    "lora": LoraConfig,
}


@dataclass(frozen=True)
class EngineConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulingConfig = field(default_factory=SchedulingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # seeds the sampler's shared generator, which requests without their own `seed` draw
    # from: the same requests in the same order sample the same tokens; None: a random seed
    seed: int | None = None

    @classmethod
    def create(cls, model: str = "", **options) -> EngineConfig:
        """From flat keyword options (`max_num_seqs=4, device="cuda"`), as `LLM(**kwargs)` takes them."""
        owner = _flat_fields()
        parts: dict[str, dict] = {name: {} for name in _PARTS}
        top = {}
        for key, value in options.items():
            if key == "seed":
                top["seed"] = value
            elif key in owner:
                aliases = _field(owner[key], key).metadata.get("value_aliases") or {}
                parts[owner[key]][key] = aliases.get(value, value) if isinstance(value, str) else value
            else:
                import difflib

                near = difflib.get_close_matches(key, [*owner, "seed"], n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise Qwen35Error(f"unknown engine option {key!r}{hint}")
        parts["load"]["model"] = model
        cfg = cls(**{name: _PARTS[name](**kw) for name, kw in parts.items()}, **top)
        cfg.validate()
        return cfg

    def replace(self, **options) -> EngineConfig:
        """A copy with some flat options changed."""
        return EngineConfig.create(self.load.model, **{**self.flat(), **options})

    def flat(self) -> dict:
        out = {"seed": self.seed}
        for name in _PARTS:
            out.update(dataclasses.asdict(getattr(self, name)))
        out.pop("model")
        return out

    def validate(self) -> None:
        c, s, p = self.cache, self.scheduler, self.parallel
        for name, value in (
            ("block_size", c.block_size),
            ("max_num_seqs", s.max_num_seqs),
            ("max_num_batched_tokens", s.max_num_batched_tokens),
            ("tensor_parallel_size", p.tensor_parallel_size),
            ("distributed_timeout", p.distributed_timeout),
        ):
            if not isinstance(value, int) or value < 1:
                raise Qwen35Error(f"{name} must be an integer >= 1, got {value!r}")
        if self.load.gguf_int4 not in GGUF_INT4:
            raise Qwen35Error(f"gguf_int4 must be one of {', '.join(GGUF_INT4)}; "
                              f"got {self.load.gguf_int4!r}")  # fmt: skip
        if self.load.int4_activations not in INT4_ACTIVATIONS:
            raise Qwen35Error(f"int4_activations must be one of {', '.join(INT4_ACTIVATIONS)}; "
                              f"got {self.load.int4_activations!r}")  # fmt: skip
        if s.max_model_len is not None and (
            not isinstance(s.max_model_len, int) or s.max_model_len < 2
        ):
            raise Qwen35Error(f"max_model_len must be an integer >= 2, got {s.max_model_len!r}")
        if isinstance(s.short_prompt_tokens, bool) or not isinstance(s.short_prompt_tokens, int) \
                or s.short_prompt_tokens < 0:  # fmt: skip
            raise Qwen35Error(f"short_prompt_tokens must be an integer >= 0, got "
                              f"{s.short_prompt_tokens!r}")  # fmt: skip
        ms = s.max_decode_step_ms
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float))
                               or not 0 <= ms < math.inf):  # fmt: skip
            raise Qwen35Error(f"max_decode_step_ms must be a number of milliseconds >= 0 (0: off), "
                              f"got {ms!r}")  # fmt: skip
        if s.num_speculative_tokens not in range(MAX_SPECULATIVE_TOKENS + 1):
            raise Qwen35Error(
                f"num_speculative_tokens must be 0 (off) or 1 .. {MAX_SPECULATIVE_TOKENS} (MTP "
                f"drafts per step), got {s.num_speculative_tokens!r}"
            )
        if not (isinstance(s.prompt_lookup_min, int) and isinstance(s.prompt_lookup_max, int)
                and 1 <= s.prompt_lookup_min <= s.prompt_lookup_max):  # fmt: skip
            raise Qwen35Error(
                f"prompt_lookup_min and prompt_lookup_max must be integers with 1 <= min <= max, "
                f"got {s.prompt_lookup_min!r} and {s.prompt_lookup_max!r}"
            )
        if s.num_scheduler_steps not in range(1, MAX_SCHEDULER_STEPS + 1):
            raise Qwen35Error(
                f"num_scheduler_steps must be 1 (off) .. {MAX_SCHEDULER_STEPS}, got "
                f"{s.num_scheduler_steps!r}"
            )
        if s.num_scheduler_steps > 1 and s.num_speculative_tokens:
            raise Qwen35Error(
                "num_scheduler_steps > 1 and speculative decoding both use the decode step's "
                "lookahead positions: choose one (set num_scheduler_steps to 1 or "
                "num_speculative_tokens to 0)"
            )
        if c.prefix_cache_dir is not None:
            if not c.enable_prefix_caching:
                raise Qwen35Error("prefix_cache_dir stores the prefix cache: it needs prefix "
                                  "caching on (drop --no-prefix-caching)")  # fmt: skip
            if Path(c.prefix_cache_dir).expanduser().exists() and not Path(
                c.prefix_cache_dir
            ).expanduser().is_dir():
                raise Qwen35Error(f"prefix_cache_dir {c.prefix_cache_dir!r} is a file, not a "
                                  f"folder")  # fmt: skip
            from qwen35.engine.cache_sizing import parse_bytes

            if (parse_bytes(c.prefix_cache_dir_size, "--prefix-cache-dir-size") or 0) < 1:
                raise Qwen35Error(f"prefix_cache_dir_size must be above 0, got "
                                  f"{c.prefix_cache_dir_size!r}")  # fmt: skip
            m = c.prefix_cache_dir_min_tokens
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise Qwen35Error(f"prefix_cache_dir_min_tokens must be an integer >= 1, got "
                                  f"{m!r}")  # fmt: skip
        if self.load.yarn is not None:
            check_yarn_factor(self.load.yarn)
        if self.load.override_generation_config is not None:
            from qwen35.generation_config import check_overrides

            check_overrides(self.load.override_generation_config)
        most = max(1024, os.cpu_count() or 1)  # torch would start them all (or overflow)
        if self.device.threads is not None and not 1 <= self.device.threads <= most:
            raise Qwen35Error(
                f"threads must be 1 to {most} (this machine has {os.cpu_count()} CPUs), got "
                f"{self.device.threads!r}"
            )
        dev = str(self.device.device)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
            raise Qwen35Error(f"device must be cpu, cuda or cuda:N, got {dev!r}")

    # ---- command line ---------------------------------------------------------------------
    @staticmethod
    def add_cli_arguments(
        parser: argparse.ArgumentParser,
        model_required: bool = True,
        only: Collection[str] | None = None,
    ) -> None:
        """Add `--model` and a flag per engine option; with `only`, just those options' flags
        (commands such as `bench` that take a few engine options next to their own)."""
        g = parser.add_argument_group("engine")
        if only is None:  # `qwen35 serve MODEL` as `vllm serve MODEL`, or --model MODEL
            g.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model, as --model")
            g.add_argument(
                "--model",
                "-m",  # (llama.cpp's spelling)
                help="model directory, Hub id (Qwen/Qwen3.5-0.8B), llama.cpp GGUF file, a model "
                "Ollama has pulled (ollama:qwen3.5:0.8b) or, with --load-format random, a catalog "
                "name",
            )
            parser.set_defaults(_model_required=model_required)
        for part in _PARTS.values():
            for f in fields(part):
                meta = f.metadata
                if not meta or meta.get("cli", True) is False:
                    continue
                if only is not None and f.name not in only:
                    continue
                flag = meta.get("flag") or "--" + f.name.replace("_", "-")
                flags = [flag, *meta.get("aliases", ())]
                if f.type == "bool" or isinstance(f.default, bool):
                    action = "store_false" if f.default else "store_true"
                    g.add_argument(*flags, dest=f.name, action=action, help=meta["help"])
                    continue
                kind = meta.get("type") or (int if "int" in str(f.type) else str)
                choices, metavar = meta.get("choices"), meta.get("metavar")
                if choices and meta.get("value_aliases"):  # accepted, not listed
                    metavar = metavar or "{" + ",".join(map(str, choices)) + "}"
                    choices = [*choices, *meta["value_aliases"]]
                g.add_argument(
                    *flags,
                    dest=f.name,
                    type=kind,
                    default=f.default,
                    choices=choices,
                    metavar=metavar,
                    nargs=meta.get("nargs"),
                    help=meta["help"],
                )

    @classmethod
    def from_cli(cls, args: argparse.Namespace, **extra) -> EngineConfig:
        owner = _flat_fields()
        options = {k: getattr(args, k) for k in owner if hasattr(args, k)}
        return cls.create(args.model or getattr(args, "model_arg", None) or "", **options, **extra)


def _field(part: str, name: str):
    return next(f for f in fields(_PARTS[part]) if f.name == name)


def _flat_fields() -> dict[str, str]:
    """flat option name -> part name (names are unique across parts)."""
    return {f.name: part for part, cls in _PARTS.items() for f in fields(cls) if f.name != "model"}
