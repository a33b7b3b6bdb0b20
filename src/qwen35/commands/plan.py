"""`qwen35 plan`: how much memory each Qwen 3.5 model needs, and what to run on a GPU.

Offline and torch-free: everything comes from the bundled configs (or a config.json) through
`qwen35.plan.planner`. Rich tables on a terminal, `--json` for scripts, `--plot` for a chart.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qwen35 import catalog
from qwen35.cache_spec import MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS
from qwen35.catalog import gpus as gpu_catalog
from qwen35.config import ModelConfig
from qwen35.plan import gguf as plan_gguf
from qwen35.plan import vision as plan_vision
from qwen35.plan.launch import hub_id, launch_commands
from qwen35.plan.params import compressed_bytes_of, has_fp8, text_tensors, weight_bytes
from qwen35.plan.planner import (
    DEFAULT_CONTEXT,
    DEFAULT_PREFILL_CHUNK,
    Deployment,
    Fit,
    LayoutError,
    ModelSummary,
    PlanError,
    Recommendation,
    check_request,
    check_speculative,
    context_error,
    plan_fit,
    recommend,
    summarize,
)
from qwen35.plan.sharding import layout_problems, valid_tp_sizes, validate_layout

JSON_SCHEMA = "qwen35.plan/1"


def _tokens(text: str) -> int:
    """'32768', '32K', '128k', '1M' (K = 1024) -> tokens."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except (ValueError, OverflowError):  # not a number, or inf / nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count (e.g. 32768 or 32K)"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        help="model name (27B, Qwen3.5-35B-A3B-FP8), a config.json / model directory, or a "
        "llama.cpp GGUF file or a model Ollama has pulled (ollama:NAME[:TAG]), planned as the "
        "engine loads it: on a CPU in the file's own storage, with --gpu in BF16; default: all "
        "eight",
    )
    p.add_argument("--gpu", "-g", help="GPU name from the catalog (RTX 4090, H100, MI300X, ...)")
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="GPU memory in GiB (any GPU not in the catalog, or to override it)",
    )
    p.add_argument(
        "--gpu-bandwidth",
        type=float,
        metavar="GB_S",
        help="memory bandwidth in GB/s for --gpu-memory (enables the decode estimate)",
    )
    p.add_argument("--num-gpus", "-n", type=int, help="GPUs (default: --tp, else 1)")
    p.add_argument(
        "--tp",
        type=int,
        help="tensor-parallel size; default: the smallest that fits, "
        "the other GPUs serve as replicas",
    )
    p.add_argument(
        "--ep",
        action="store_true",
        help="MoE: divide the routed experts whole across all GPUs (expert parallel)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp8", "int8", "int4"),
        help="weights; default: bf16, and fp8 where an FP8 checkpoint exists (--dtype fp8 plans "
        "any model: without one the engine quantizes at load, --quantization fp8). int8 / int4: "
        "the weight-only formats (--quantization): without --gpu a CPU plan (sizes and decode "
        "bytes per token), with it a GPU one",
    )
    p.add_argument(
        "--cpu-bandwidth",
        type=float,
        default=None,
        help="with --dtype int8/int4: memory bandwidth in GB/s for a decode roofline",
    )
    p.add_argument(
        "--cpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="with --dtype int8/int4 (or a GGUF file): the memory a CPU engine is given (`serve "
        "--max-memory`): whether --batch sequences of --context tokens fit, the longest context "
        "and the most sequences, sized as the engine sizes its caches",
    )
    p.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="KV cache (bf16; fp8: the engine's --kv-cache-dtype fp8)")  # fmt: skip
    p.add_argument(
        "--state-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="DeltaNet recurrent state (fp32, as the checkpoints' mamba_ssm_dtype; bf16: the "
        "engine's --mamba-ssm-cache-dtype bf16)",
    )
    p.add_argument(
        "--context",
        type=_tokens,
        default=None,
        help=f"tokens per sequence (default {DEFAULT_CONTEXT}, or a shorter model's native "
        "context; 32K and 128k work)",
    )
    p.add_argument(
        "--yarn",
        type=float,
        metavar="FACTOR",
        help="YaRN RoPE scaling past the native 262,144 tokens (Qwen's recipe: 4, up to "
        "1,048,576; the engine's --yarn)",
    )
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences (default 1)")
    p.add_argument(
        "--chunk",
        type=_tokens,
        default=DEFAULT_PREFILL_CHUNK,
        help=f"prefill chunk in tokens, sizes working memory (default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument(
        "--text-only",
        action="store_true",
        help="leave out the vision tower and MTP head (a text-only deployment)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=0,
        choices=range(MAX_SPECULATIVE_TOKENS + 1),
        metavar=f"{{0..{MAX_SPECULATIVE_TOKENS}}}",
        help="k > 0: plan for k drafts a step (k spare DeltaNet states per sequence, and for "
        "MTP drafts the MTP head's KV layer, as `qwen35 serve --num-speculative-tokens k` "
        "allocates)",
    )
    p.add_argument(
        "--speculative-method",
        default="mtp",
        choices=SPECULATIVE_METHODS,
        help="with --num-speculative-tokens: drafts from the MTP head (default) or by prompt "
        "lookup ('ngram': no MTP KV, works --text-only)",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=0,
        metavar="N",
        help="plan for N LoRA adapters served per request (as `qwen35 serve --enable-lora "
        "--max-loras N` allocates on a GPU: N x --max-lora-rank rows on every decoder linear)",
    )
    p.add_argument("--max-lora-rank", type=int, default=16, metavar="R",
                   help="with --max-loras: the largest adapter rank (default 16)")  # fmt: skip
    p.add_argument(
        "--image",
        action="append",
        type=plan_vision.image_size,
        metavar="WxH",
        help="tokens per image of this size and the vision encoder's working memory (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="memory vs context per model (matplotlib)")


# ---- gathering -------------------------------------------------------------------------------


@dataclass
class Row:
    """One model with the dtypes to plan, its sizes and (with a GPU) a Fit or refusal per dtype."""

    summary: ModelSummary
    dtypes: list[str]
    fits: dict[str, Fit | str]  # dtype -> Fit on --gpu, or why no layout exists
    by_gpu: dict[str, dict[str, Fit | str]] = field(default_factory=dict)  # default view


def _resolve_models(spec: str | None, dtype: str | None) -> list[tuple[ModelConfig, list[str]]]:
    if spec is None:
        cfgs = [catalog.load_model_config(n) for n in catalog.base_model_names()]
        out = [(c, [d for d in ("bf16", "fp8") if d != "fp8" or has_fp8(c)]) for c in cfgs]
        if dtype:  # (FP8 for every model: the ones without a release quantized at load)
            out = [(c, [dtype]) for c, _ in out]
        return out
    path = Path(spec).expanduser()
    if plan_gguf.is_gguf(spec):  # on a GPU as on a CPU: the file's storage (CPU plan: _run_cpu)
        m = _gguf(spec)
        held = dtype or m.storage or "bf16"
        how = {"int4": "in int4, its 4-bit tensors' values kept", "int8": "in int8",
               "bf16": "in BF16", "fp8": "in FP8, quantized at load"}[held]  # fmt: skip
        print(f"note: on a GPU the engine holds {path.name}'s weights {how} (the file "
              f"{m.file_bytes / 2**30:.2f} GiB, BF16 {weight_bytes(m.cfg, 'bf16') / 2**30:.2f} "
              "GiB; plan --dtype bf16 | fp8 | int8 | int4 for the others)",
              file=sys.stderr)  # fmt: skip
        return [(m.cfg, [held])]
    path = _config_path(spec)  # (a Hub repository's config from the Hugging Face cache)
    if path.exists() or spec.endswith(".json") or spec.startswith(("/", ".", "~")):
        cfg = ModelConfig.from_hf(path)  # a missing path gets "no config file at ..."
        forced = "fp8" if cfg.quantization else None
        if cfg.compressed is not None and not forced:
            c = cfg.compressed
            gpu = ("in FP8, its 4-bit values exactly (blocks of one row; in int4 as stored with "
                   "--quantization int4: plan --dtype int4)" if c.fp8_rows else
                   "in BF16 (--quantization fp8: in FP8, quantized at load)")  # fmt: skip
            print(f"note: {path.name} holds {c.kind} weights: a GPU engine holds them {gpu}, a "
                  f"CPU one in {c.cpu_storage} as stored: qwen35 plan -m {spec} --dtype "
                  f"{c.cpu_storage}", file=sys.stderr)  # fmt: skip
            if c.fp8_rows and not dtype:
                return [(cfg, ["fp8"])]  # (as the engine loads it on a GPU)
    else:
        name = _resolve_name(spec)
        forced = "fp8" if name.endswith("-FP8") else None
        cfg = catalog.load_model_config(name.removesuffix("-FP8"))
    if forced and dtype == "bf16":
        raise PlanError(f"{spec} is an FP8 checkpoint; plan its BF16 form by the base model's name")
    dtypes = [dtype] if dtype else ([forced] if forced else ["bf16"] + (["fp8"] * has_fp8(cfg)))
    for d in dtypes:
        check_request(cfg, d, 1, None, 1, 1)  # dtype availability, with a clear message
    return [(cfg, dtypes)]


def _with_yarn(models: list[tuple[ModelConfig, list[str]]], args):
    """--yarn FACTOR: every model with YaRN RoPE scaling (the context it allows grows)."""
    factor = getattr(args, "yarn", None)
    if factor is None:
        return models
    try:
        return [(c.with_yarn(factor), ds) for c, ds in models]
    except ValueError as e:
        raise PlanError(str(e)) from None


def _compressed_storage(spec: str | None) -> str | None:
    """The CPU storage `--dtype auto` gives a compressed-tensors / GPTQ / AWQ checkpoint
    directory (int4 / int8: CompressedConfig.cpu_storage), else None."""
    path = _config_path(spec) if spec else None
    if path is None or not (path / "config.json").is_file():
        return None
    cfg = ModelConfig.from_hf(path)
    return cfg.compressed.cpu_storage if cfg.compressed and not cfg.quantization else None


def _config_path(spec: str) -> Path:
    """`-m SPEC` as a path: itself, or where it is not one, a Hub repository's cached snapshot
    holding its config.json (_hub_config)."""
    path = Path(spec).expanduser()
    if not path.exists() and (cached := _hub_config(spec)) is not None:
        return cached.parent
    return path


@functools.lru_cache(maxsize=4)
def _gguf(spec: str) -> plan_gguf.GgufModel:
    return plan_gguf.load(spec)  # (a bad file: GGUFError, which the CLI prints as it is)


def _hub_config(spec: str) -> Path | None:
    """A Hub repository's config.json (`USER/REPO`, not a catalog name) in the Hugging Face
    cache, without the network (the planner never downloads); None otherwise."""
    if spec.count("/") != 1 or spec.startswith(("/", ".", "~")):
        return None
    try:
        catalog.resolve_name(spec)
        return None  # (a catalog name: its bundled config)
    except catalog.UnknownNameError:
        pass
    try:
        from huggingface_hub import try_to_load_from_cache

        from qwen35.model_source import hub_cache_dir

        got = try_to_load_from_cache(spec, "config.json", cache_dir=hub_cache_dir())
    except Exception:  # (a malformed repository id, no cache)
        return None
    return Path(got) if isinstance(got, str) else None


def _resolve_name(spec: str) -> str:
    try:
        return catalog.resolve_name(spec)
    except catalog.UnknownNameError as e:
        owner = spec.split("/")[0].lower() if spec.count("/") == 1 else None
        if owner not in (None, "qwen", "") and not spec.startswith((".", "~")):
            raise PlanError(
                f"{spec!r} is not a catalog model, and no config.json of that Hub repository is "
                f"in the Hugging Face cache: `hf download {spec} config.json` (the plan reads "
                "only the config), or plan a catalog name or a local directory"
            ) from None
        if "did you mean" in str(e):
            raise
        # "28B" is far from "Qwen3.5-27B" as a whole string; compare the size tags instead
        tags = [n.removeprefix("Qwen3.5-") for n in catalog.model_names()]
        raise catalog.did_you_mean("model", spec, tags) from None


def _resolve_gpu(args) -> gpu_catalog.GpuSpec | None:
    if args.gpu_memory is not None and not 0 < args.gpu_memory < math.inf:
        raise PlanError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}")
    if args.gpu_bandwidth is not None and not 0 < args.gpu_bandwidth < math.inf:
        raise PlanError(f"--gpu-bandwidth must be a positive GB/s, got {args.gpu_bandwidth:g}")
    if args.gpu:
        g = gpu_catalog.load_gpu(args.gpu)
        if args.gpu_memory is not None:
            g = gpu_catalog.GpuSpec(
                f"{g.name} ({args.gpu_memory:g} GiB)",
                args.gpu_memory,
                args.gpu_bandwidth or g.bandwidth_gb_s,
                g.bf16_tflops,
                g.source,
            )
        return g
    if args.gpu_memory is not None:
        return gpu_catalog.custom_gpu(args.gpu_memory, args.gpu_bandwidth)
    return None


def _fits(cfg: ModelConfig, dtypes: list[str], gpu, args) -> dict:
    out: dict[str, Fit | str] = {}
    for d in dtypes:
        try:
            out[d] = plan_fit(
                cfg,
                gpu,
                dtype=d,
                num_gpus=args.num_gpus,
                tp=args.tp,
                ep=args.ep,
                kv_dtype=args.kv_dtype,
                state_dtype=args.state_dtype,
                context=args.context,
                batch=args.batch,
                text_only=args.text_only,
                chunk_tokens=args.chunk,
                speculative_tokens=args.num_speculative_tokens,
                lora_slots=(args.max_loras, args.max_lora_rank),
                speculative_method=args.speculative_method,
                bytes_of=plan_gguf.rank_bytes(_gguf(args.model), d)
                if plan_gguf.is_gguf(args.model) and d in ("int8", "int4") else None,
            )
        except LayoutError as e:
            out[d] = str(e)
    return out


def _recommend(rows: list[Row], gpu_name: str | None = None) -> Recommendation | None:
    fits = [f for r in rows for f in (r.by_gpu[gpu_name] if gpu_name else r.fits).values()]
    return recommend([f for f in fits if isinstance(f, Fit)])


def gather(args) -> tuple[list[Row], gpu_catalog.GpuSpec | None]:
    if args.num_gpus is None:
        args.num_gpus = args.tp if args.tp and args.tp > 0 else 1
    for flag, val in (
        ("--num-gpus", args.num_gpus),
        ("--batch", args.batch),
        ("--context", args.context),
        ("--chunk", args.chunk),
    ):
        if val is not None and val < 1:
            raise PlanError(f"{flag} must be at least 1, got {val}")
    if args.tp is not None and (args.tp < 1 or args.num_gpus % args.tp):
        raise PlanError(f"--tp {args.tp} must be >= 1 and divide --num-gpus {args.num_gpus}")
    gpu = _resolve_gpu(args)
    rows = []
    models = _with_yarn(_resolve_models(args.model, args.dtype), args)
    if args.context is None:  # the default: 32K, or a shorter model's whole native context
        shortest = min((c for c, _ in models), key=lambda c: c.max_position_embeddings)
        args.context = min(DEFAULT_CONTEXT, shortest.max_position_embeddings)
        if args.context < DEFAULT_CONTEXT:
            print(f"note: planning at {args.context:,} tokens, the native context of "
                  f"{shortest.name} (--context N to choose)", file=sys.stderr)  # fmt: skip
    def ep(c: ModelConfig) -> int:  # expert-parallel size of an explicit layout
        return args.num_gpus if args.ep and c.is_moe else 1

    if args.tp and not args.model:  # the whole family at one tensor-parallel size
        if all(layout_problems(c, args.tp, ep(c), d) for c, ds in models for d in ds):
            ok = set.intersection(*(set(valid_tp_sizes(c, ep(c), ds[0])) for c, ds in models))
            raise PlanError(
                f"--tp {args.tp} cannot split any Qwen 3.5 model ("
                + "; ".join(layout_problems(models[0][0], args.tp, ep(models[0][0]))) + " for "
                f"{models[0][0].name}); sizes that split all of them: "
                + ", ".join(map(str, sorted(ok)))
            )
    for cfg, dtypes in models:
        if args.context > cfg.max_position_embeddings:
            raise PlanError(context_error(cfg, args.context))
        check_speculative(cfg, args.num_speculative_tokens, args.text_only, args.speculative_method)
        if args.model and args.tp:  # an explicit layout for one model: refuse it if impossible
            bad = [d for d in dtypes if layout_problems(cfg, args.tp, ep(cfg), d)]
            if len(bad) == len(dtypes):
                validate_layout(cfg, args.tp, ep(cfg), bad[0])
        s = summarize(cfg, args.kv_dtype, args.state_dtype, args.num_speculative_tokens,
                      args.speculative_method)  # fmt: skip
        rows.append(Row(s, dtypes, _fits(cfg, dtypes, gpu, args) if gpu else {}))
    return rows, gpu


# ---- JSON ------------------------------------------------------------------------------------


def _fit_json(f: Fit | str) -> dict:
    if isinstance(f, str):
        return {"fits": False, "loads": False, "reason": f}
    d = f.deployment
    return {
        "fits": f.fits,
        "loads": f.loads,
        "reason": f.reason or None,
        "tp": d.tp,
        "dp": d.dp,
        "ep": d.ep_size,
        "weights_bytes_per_gpu": f.weights,
        "overhead_bytes_per_gpu": f.overhead,
        "working_bytes_per_gpu": f.working,
        "kv_bytes_per_token_per_gpu": f.kv_bytes_per_token,
        "state_bytes_per_sequence_per_gpu": f.state_bytes_per_sequence,
        "max_context": f.max_context,
        "max_context_capped": f.max_context_capped,
        "max_concurrency": f.max_concurrency,
        "decode_tokens_per_s_estimate": _round(f.decode_tokens_per_s),
        "decode_tokens_per_s_batch1": _round(f.decode_tokens_per_s_batch1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _rec_json(r: Recommendation | None, gpu=None, model: str | None = None) -> dict | None:
    if r is None:
        return None
    return {
        "gpu": (gpu or r.fit.gpu).name,
        "model": r.fit.deployment.cfg.name,
        "dtype": r.fit.deployment.dtype,
        "tp": r.fit.deployment.tp,
        "why": r.why,
        "launch": launch_commands(r.fit.deployment, r.fit.context, model),
    }


def to_json(rows: list[Row], gpu, args, common: list[tuple] | None = None) -> dict:
    models = []
    for r in rows:
        s, p = r.summary, r.summary.params
        m = {
            "name": s.cfg.name,
            "moe": s.cfg.is_moe,
            "params_total": p.total,
            "params_text": p.text,
            "params_vision": p.vision,
            "params_mtp": p.mtp,
            "params_active": p.active,
            "weights_bytes": s.weights_bytes,
            "weights_bytes_text_only": s.weights_bytes_text_only,
            "kv_bytes_per_token": s.kv_bytes_per_token,
            "state_bytes_per_sequence": s.state_bytes_per_sequence,
            "max_position_embeddings": s.cfg.max_position_embeddings,
            "yarn_factor": s.cfg.yarn.factor if s.cfg.yarn else None,
        }
        if gpu:
            m["fits"] = {
                d: (_fit_json(r.fits[d]) if d in r.fits else None)
                for d in ("bf16", "fp8", *(x for x in r.dtypes if x not in ("bf16", "fp8")))
            }
        models.append(m)
    out = {
        "schema": JSON_SCHEMA,
        "request": {
            "model": args.model,
            "gpu": gpu.name if gpu else None,
            "num_gpus": args.num_gpus,
            "tp": args.tp,
            "ep": args.ep,
            "dtype": args.dtype,
            "kv_dtype": args.kv_dtype,
            "state_dtype": args.state_dtype,
            "context": args.context,
            "batch": args.batch,
            "chunk": args.chunk,
            "text_only": args.text_only,
            "num_speculative_tokens": args.num_speculative_tokens,
            "speculative_method": args.speculative_method,
            "max_loras": args.max_loras,
            "max_lora_rank": args.max_lora_rank,
        },
        "gpu": gpu.to_json() if gpu else None,
        "models": models,
        "recommendation": (_rec_json(_recommend(rows), model=plan_gguf.launch_model(args.model))
                           if gpu else None),  # fmt: skip
    }
    if common is not None:
        out["recommendations_common_gpus"] = [_rec_json(rec, g) for g, rec in common]
    return out


# ---- entry -----------------------------------------------------------------------------------


def run(args) -> int:
    if args.max_loras < 0 or args.max_lora_rank < 1:
        raise PlanError("--max-loras must be >= 0 and --max-lora-rank >= 1")
    if args.cpu_bandwidth is not None and not 0 < args.cpu_bandwidth < math.inf:
        raise PlanError(f"--cpu-bandwidth must be a positive GB/s, got {args.cpu_bandwidth:g}")
    if args.cpu_memory is not None and not 0 < args.cpu_memory < math.inf:
        raise PlanError(f"--cpu-memory must be a positive number of GiB, got {args.cpu_memory:g}")
    gpu_asked = args.gpu or args.gpu_memory is not None
    gguf = plan_gguf.is_gguf(args.model)
    if gguf and args.dtype is None and not gpu_asked:  # as `--dtype auto` loads it on a CPU
        args.dtype = _gguf(args.model).storage or "bf16"
    if args.cpu_memory is not None and not gpu_asked and args.dtype is None:
        args.dtype = _compressed_storage(args.model)  # (compressed-tensors: as it loads)
    if args.cpu_memory is not None and not gpu_asked and args.dtype in (None, "bf16"):
        args.dtype = "bf16"  # a CPU engine's memory, the model as stored
    cpu_bf16 = args.dtype == "bf16" and not gpu_asked and (gguf or args.cpu_memory is not None)
    if args.dtype in ("int8", "int4") and not gpu_asked or cpu_bf16:
        return _run_cpu(args)
    for flag, val in (("--cpu-bandwidth", args.cpu_bandwidth), ("--cpu-memory", args.cpu_memory)):
        if val is not None:
            raise PlanError(f"{flag} goes with the CPU plans (--dtype int8 / int4, or "
                            "--cpu-memory without --gpu)")  # fmt: skip
    rows, gpu = gather(args)
    common = None
    if gpu is None and args.model is None:
        common = []
        for name in gpu_catalog.common_gpu_names():
            g = gpu_catalog.load_gpu(name)
            for r in rows:
                r.by_gpu[name] = _fits(r.summary.cfg, r.dtypes, g, args)
            common.append((g, _recommend(rows, name)))
    images = getattr(args, "image", None)
    if images:
        images = plan_vision.image_plans([r.summary.cfg for r in rows], images)
    if args.json:
        body = to_json(rows, gpu, args, common)
        if images:
            body["images"] = images
        print(json.dumps(body, indent=2))
    else:
        from qwen35.plan import view as plan_view

        plan_view.render(rows, gpu, args, common)
        if images:
            print(plan_vision.render(images))
    if args.plot:
        from qwen35.plan import view as plan_view

        path = plan_view.plot(rows, gpu, args)
        if not args.json:
            print(f"wrote {path}")
    return 0


def _serve_model(cfg: ModelConfig, spec: str | None) -> str:
    """What `--model` names for a planned model: the directory given (a config.json's), else
    the Hub id of a catalog name (launch.hub_id)."""
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.exists():
        return str(path.parent if path.is_file() else path)
    return hub_id(Deployment(cfg))


def _run_cpu(args) -> int:
    from qwen35.plan import cpu

    if plan_gguf.is_gguf(args.model):
        m = _gguf(args.model)
        (cfg, _), = _with_yarn([(m.cfg, [])], args)
        cfgs = [cfg]
        rows = cpu.cpu_rows(cfgs, args.dtype, plan_gguf.bytes_of(m, text_tensors(cfg)))
        rows[0]["file"] = {"path": str(m.path), "bytes": m.file_bytes, "type": m.file_type}
    else:
        cfgs = [c for c, _ in _with_yarn(_resolve_models(args.model, None), args)]
        c = cfgs[0] if len(cfgs) == 1 else None
        rows = (cpu.cpu_rows(cfgs, args.dtype, compressed_bytes_of(c)) if c and c.compressed
                else cpu.cpu_rows(cfgs, args.dtype))  # fmt: skip
    if args.cpu_memory is not None:
        for flag, val in (("--batch", args.batch), ("--context", args.context),
                          ("--chunk", args.chunk)):  # fmt: skip
            if val is not None and val < 1:
                raise PlanError(f"{flag} must be at least 1, got {val}")
        for c, r in zip(cfgs, rows, strict=True):
            context = args.context or min(DEFAULT_CONTEXT, c.max_position_embeddings)
            if context > c.max_position_embeddings:
                raise PlanError(context_error(c, context))
            r["memory"] = cpu.memory_fit(
                c, r["weights_bytes"][args.dtype], int(args.cpu_memory * 2**30), context,
                args.batch, args.chunk, args.kv_dtype, args.state_dtype)  # fmt: skip
            r["memory"]["serve"] = cpu.serve_command(
                plan_gguf.serve_model(args.model) or _serve_model(c, args.model), args.dtype,
                args.cpu_memory, context, args.batch, args.chunk, args.kv_dtype,
                args.state_dtype)  # fmt: skip
    if args.json:
        print(json.dumps({"schema": cpu.SCHEMA, "dtype": args.dtype, "models": rows}, indent=2))
    else:
        cpu.render(rows, args.dtype, args.cpu_bandwidth)
    return 0


__all__ = ["JSON_SCHEMA", "Row", "add_arguments", "gather", "run", "to_json"]
