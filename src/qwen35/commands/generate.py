"""`qwen35 generate`: one prompt, the reply streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from qwen35.commands.common import (
    add_engine_arguments,
    add_lora_argument,
    add_sampling_arguments,
    add_thinking_argument,
    engine_config,
    lora_name,
    sampling_params,
    thinking_kwargs,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    add_sampling_arguments(p)
    add_lora_argument(p)
    p.add_argument("prompt_arg", nargs="?", metavar="PROMPT",
                   help="the prompt, as --prompt: qwen35 generate MODEL PROMPT")  # fmt: skip
    p.add_argument("--prompt", "-p", default=None,
                   help="prompt text (default: read standard input)")  # fmt: skip
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat format"
    )
    add_thinking_argument(p, when="with --chat: ")


def run(args: argparse.Namespace) -> int:
    from qwen35.engine.llm_engine import LLM

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    sampling_params(args)  # (bad flags refused before the model loads)
    llm = LLM(args.model, engine_config(args), progress=sys.stderr.isatty())
    params = sampling_params(args, llm.engine.default_sampling)
    if args.chat:
        kwargs = thinking_kwargs(args)
        prompt = llm.engine.chat_template.render(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, **kwargs
        )
    final = None
    for delta in llm.stream(prompt, params, lora=lora_name(args)):
        for o in delta.outputs:
            sys.stdout.write(o.text)
            sys.stdout.flush()
            final = o.finish_reason or final
    sys.stdout.write("\n")
    print(f"[finish: {final}]", file=sys.stderr)
    return 0
