"""`qwen35 chat`: interactive chat with history; /reset clears it, /exit leaves."""

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
    p.add_argument("--system", default=None, help="system prompt")
    add_thinking_argument(p)


def run(args: argparse.Namespace) -> int:
    from qwen35.chat_format import prompt_thinking_enabled
    from qwen35.engine.llm_engine import LLM
    from qwen35.server.parsers import ChatOutputParser

    sampling_params(args)  # (bad flags refused before the model loads)
    llm = LLM(args.model, engine_config(args), progress=sys.stderr.isatty())
    params = sampling_params(args, llm.engine.default_sampling)
    kwargs = thinking_kwargs(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("qwen35 chat: /reset clears the history, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.engine.chat_template.render(
            system + history, add_generation_prompt=True, **kwargs
        )
        parser = ChatOutputParser(thinking_enabled=prompt_thinking_enabled(prompt), tools=None)
        text = ""
        for delta in llm.stream(prompt, params, lora=lora_name(args)):
            for o in delta.outputs:
                text += o.text
                d = parser.feed(o.text)
                if d.reasoning:
                    dim = sys.stdout.isatty()
                    sys.stdout.write(f"\x1b[2m{d.reasoning}\x1b[0m" if dim else d.reasoning)
                if d.content:
                    sys.stdout.write(d.content)
                sys.stdout.flush()
        reasoning, content, _ = parser.parse_full(text)
        sys.stdout.write("\n")
        history.append(
            {"role": "assistant", "content": content or "", "reasoning_content": reasoning}
        )
