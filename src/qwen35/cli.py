"""`qwen35` command line: subcommands dispatch lazily so `qwen35 plan` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from qwen35.errors import Qwen35Error, shown

# subcommand -> (module under qwen35.commands, one-line help)
COMMANDS = {
    "plan": ("plan", "memory plan: what fits which GPU, at what context, concurrency and speed"),
    "generate": ("generate", "generate text for a prompt, streamed to the terminal"),
    "chat": ("chat", "interactive chat with a model"),
    "serve": ("serve", "OpenAI-compatible HTTP server"),
    "run-batch": (
        "run_batch",
        "offline batch of OpenAI requests from a JSONL file (the Batch API's format)",
    ),
    "bench": ("bench", "benchmark the engine against transformers on the same model"),
    "quantize": (
        "quantize",
        "write a model directory in the official FP8 layout (or back to BF16)",
    ),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35", description="Plan and run the Qwen 3.5 family.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # only the chosen subcommand's module is imported (keeps `plan` light and fast)
        if name == chosen:
            mod = importlib.import_module(f"qwen35.commands.{module}")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run, _parser=p)
    return parser


def _local_models(args: argparse.Namespace) -> None:
    """`ollama:NAME` or `USER/REPO-GGUF[:QUANT]` as the model (model_source.py): its GGUF file,
    its vision tower as --mmproj and (Ollama) its sampling parameters as
    --override-generation-config unless those are given, and a server's default names the ones
    typed (Ollama's full name too: clients keep their `model`)."""
    from qwen35.model_source import local, needs_resolving

    for attr in ("model", "in_dir"):  # (in_dir: qwen35 quantize)
        spec = getattr(args, attr, None)
        if not needs_resolving(spec):
            continue
        src = local(spec, download=args.command != "plan")  # (a plan never downloads)
        setattr(args, attr, src.path)
        if src.mmproj is not None and args.command != "plan":  # (plans count the text weights)
            if hasattr(args, "mmproj"):
                args.mmproj = args.mmproj or src.mmproj
            else:
                from qwen35.gguf_checkpoint import use_mmproj

                use_mmproj(src.path, src.mmproj)
        if src.sampling and getattr(args, "override_generation_config", False) is None:
            args.override_generation_config = dict(src.sampling)
        if args.command in ("serve", "run-batch") and not args.served_model_name:
            names = list(src.names)
            args.served_model_name = names if args.command == "serve" else names[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    if hasattr(args, "model_arg"):  # the engine commands: MODEL or --model MODEL
        here = args._parser
        if hasattr(args, "prompt_arg"):  # generate [MODEL] [PROMPT]: --model M PROMPT too
            if args.prompt_arg is None and args.model is not None:
                args.prompt_arg, args.model_arg = args.model_arg, None
            if args.prompt_arg is not None:
                if args.prompt is not None:
                    here.error(f"two prompts given: {args.prompt_arg!r} and --prompt "
                               f"{args.prompt!r}; give it once")  # fmt: skip
                args.prompt = args.prompt_arg
        if args.model_arg is not None:
            if args.model not in (None, args.model_arg):
                here.error(f"two models given: {args.model_arg!r} and --model {args.model!r}; "
                           "give it once")  # fmt: skip
            args.model = args.model_arg
        if args._model_required and not args.model:
            here.error(f"a model is required: qwen35 {args.command} MODEL (or --model MODEL)")
    try:
        _local_models(args)
        return int(args._run(args) or 0)
    except Qwen35Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the OS refused (too long, no permission, a full disk, ...)
        if e.filename is None:
            raise
        print(f"error: {e.strerror or e}: {shown(e.filename)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
