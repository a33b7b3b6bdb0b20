"""Engine and sampling options shared by `generate`, `chat`, `serve` and `bench`; `--thinking`
of `generate --chat` and `chat`."""

from __future__ import annotations

import argparse
import os


def add_engine_arguments(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    """The engine's flags, generated from `EngineConfig`'s fields (one declaration)."""
    from qwen35.engine.config import EngineConfig

    EngineConfig.add_cli_arguments(p, model_required=model_required)


def engine_config(args: argparse.Namespace, **extra):
    """The engine flags' EngineConfig; with `--lora` (add_lora_argument) that adapter is
    served too (see lora_name)."""
    from qwen35.engine.config import EngineConfig

    lora = getattr(args, "lora", None)
    if lora is not None and lora not in _lora_names(args):
        mods = list(args.lora_modules or []) + [f"{LORA_NAME}={lora}"]
        args = argparse.Namespace(**{**vars(args), "lora_modules": mods})
    return EngineConfig.from_cli(args, **extra)


def engine_on_its_thread(args: argparse.Namespace, **extra):
    """(EngineThread, LLMEngine) for `serve` and `run-batch`: the engine is built on the thread
    that will step it (engine/engine_thread.py); a load error is raised here."""
    import sys

    from qwen35.engine.engine_thread import EngineThread
    from qwen35.engine.llm_engine import LLMEngine

    thread = EngineThread()
    try:
        engine = thread.call(LLMEngine, args.model, engine_config(args, **extra),
                             progress=sys.stderr.isatty())  # fmt: skip
    except BaseException:
        thread.close()
        raise
    return thread, engine


LORA_NAME = "lora"  # the adapter `--lora DIR` serves


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        default=None,
        metavar="DIR|NAME",
        help="run with this LoRA adapter: a PEFT adapter directory, or a NAME of "
        "--lora-modules (to bake it into the weights instead: qwen35 quantize --lora)",
    )


def lora_name(args: argparse.Namespace) -> str | None:
    """The adapter requests run with: --lora's NAME (of --lora-modules), or the one its
    directory was served as; None without --lora."""
    lora = getattr(args, "lora", None)
    if lora is None:
        return None
    return lora if lora in _lora_names(args) else LORA_NAME


def _lora_names(args: argparse.Namespace) -> set[str]:
    from qwen35.engine.config import parse_lora_module

    return {parse_lora_module(item)[0] for item in getattr(args, "lora_modules", None) or []}


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    for flag, kind in (("--temperature", float), ("--top-p", float), ("--top-k", int),
                       ("--min-p", float), ("--repetition-penalty", float),
                       ("--presence-penalty", float)):  # fmt: skip
        name = flag[2:].replace("-", "_")
        g.add_argument(flag, type=kind, default=None,
                       help=f"default: the model's (generation_config.json, "
                            f"--override-generation-config), else {_FALLBACK[name]}")  # fmt: skip
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="think at most N tokens, then answer (</think> is forced; chat prompts "
                        "with thinking on)")  # fmt: skip


# the sampling generate / chat use where neither the flags nor the model (its
# generation_config.json, --override-generation-config) say
_FALLBACK = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
             "repetition_penalty": 1.0, "presence_penalty": 0.0}  # fmt: skip


def sampling_params(args: argparse.Namespace, defaults: dict | None = None):
    """The flags' sampling; a flag not given takes the model's request default (`defaults`:
    the engine's default_sampling, as the server's requests do), else _FALLBACK."""
    from qwen35.request import SamplingParams

    d = {**_FALLBACK, **(defaults or {})}
    pick = {k: getattr(args, k) if getattr(args, k) is not None else d[k] for k in _FALLBACK}
    if "frequency_penalty" in d:  # (no flag of its own: the model's only)
        pick["frequency_penalty"] = d["frequency_penalty"]
    return SamplingParams(
        max_tokens=args.max_tokens,
        **pick,
        seed=args.seed,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
        thinking_token_budget=args.thinking_budget,
    ).validate()


def add_thinking_argument(p: argparse.ArgumentParser, when: str = "") -> None:
    p.add_argument(
        "--thinking",
        choices=["on", "off", "default"],
        default="default",
        help=f"{when}thinking on or off (default: the model size's default)",
    )


def thinking_kwargs(args: argparse.Namespace) -> dict:
    """The chat template's keyword arguments for --thinking (none for "default")."""
    return {} if args.thinking == "default" else {"enable_thinking": args.thinking == "on"}


def require_file(flag: str, path: str) -> None:
    """Refuse `path` given with `flag` unless it is a file: a folder or a missing path, named."""
    if not os.path.isfile(path):
        from qwen35.errors import Qwen35Error

        what = "a folder, not a file" if os.path.isdir(path) else "no such file"
        raise Qwen35Error(f"{flag} {path}: {what}")
