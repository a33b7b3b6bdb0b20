"""vLLM `serve` flags that the Qwen 3.5 recipes pass, accepted by `qwen35 serve` so a recipe's
command line runs as written (`vllm serve Qwen/Qwen3.5-35B-A3B --reasoning-parser qwen3
--enable-auto-tool-choice --tool-call-parser qwen3_coder ...` -> `qwen35 serve ...`).

Some need nothing here: Qwen 3.5's think blocks and tool calls are always parsed
(`--reasoning-parser`, `--enable-auto-tool-choice`, `--tool-call-parser`: only the parsers that
read Qwen 3.5's formats are accepted), nothing from a checkpoint runs as code
(`--trust-remote-code`), prefix caching and chunked prefill are on (`--enable-prefix-caching`,
`--enable-chunked-prefill`; `--no-enable-prefix-caching` is `--no-prefix-caching`), and no
periodic stats are logged (`--disable-log-stats`); `--disable-log-requests` turns the access
log's line a request off. The others map onto this engine's options: `--language-model-only` is
`--text-only`, `--speculative-config '{"method": "mtp", "num_speculative_tokens": 2}'` sets
`--speculative-method` / `--num-speculative-tokens` (/ `--prompt-lookup-max` / `-min` for
"ngram"), and `--gpu-memory-utilization F` makes `--max-memory` F x the GPU's memory.
"""

from __future__ import annotations

import argparse
import json

from qwen35.errors import Qwen35Error

# the vLLM parser names that read Qwen 3.5's output formats
REASONING_PARSERS = ("qwen3", "deepseek_r1")  # <think> ... </think>
TOOL_CALL_PARSERS = ("qwen3_coder", "qwen3_xml")  # <tool_call><function=...><parameter=...>
SPEC_METHODS = {"mtp": "mtp", "qwen3_next_mtp": "mtp", "qwen3_5_mtp": "mtp", "ngram": "ngram"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM's flags (a recipe's command line runs as written)")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                   help="accepted: Qwen 3.5's <think> blocks are always returned as "
                        "reasoning_content")  # fmt: skip
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted: tool calls are always parsed (tool_choice auto)")  # fmt: skip
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                   help="accepted: Qwen 3.5's XML tool calls are always parsed")  # fmt: skip
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted: no checkpoint code is ever run")  # fmt: skip
    g.add_argument("--language-model-only", action="store_true", help="as --text-only")
    # (the engine's own enable_prefix_caching, default on; no default of their own)
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                   default=argparse.SUPPRESS, help="accepted: prefix caching is on by default")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", default=argparse.SUPPRESS,
                   help="as --no-prefix-caching")  # fmt: skip
    for flag, what in (("--enable-chunked-prefill", "accepted: prompts are always chunked"),
                       ("--disable-log-requests", "no access-log line per request"),
                       ("--disable-log-stats", "accepted: no periodic stats are logged")):  # fmt: skip
        g.add_argument(flag, action="store_true", dest="_vllm_" + flag[2:].replace("-", "_"),
                       help=what)  # fmt: skip
    g.add_argument("--speculative-config", metavar="JSON",
                   help='e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\' (method mtp or '
                        "ngram; ngram also prompt_lookup_max / _min): sets --speculative-method "
                        "and --num-speculative-tokens")  # fmt: skip
    g.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help="GPU: --max-memory is F x the GPU's memory (weights, caches and working "
                        "memory together, as vLLM's)")  # fmt: skip


def apply(args: argparse.Namespace) -> None:
    """Turn the mapped flags into this engine's options (before the engine config is built);
    a bad value is an error naming the flag."""
    if args.language_model_only:
        args.text_only = True
    if args.speculative_config is not None:
        _speculative(args)
    if args.gpu_memory_utilization is not None:
        args.max_memory = gpu_memory(args.gpu_memory_utilization, args.device, args.max_memory)


def _speculative(args: argparse.Namespace) -> None:
    try:
        cfg = json.loads(args.speculative_config)
    except json.JSONDecodeError as e:
        raise Qwen35Error(f"--speculative-config is not JSON ({e}): e.g. "
                          '\'{"method": "mtp", "num_speculative_tokens": 2}\'') from None  # fmt: skip
    if not isinstance(cfg, dict):
        raise Qwen35Error("--speculative-config must be a JSON object")
    known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise Qwen35Error(f"--speculative-config: {', '.join(unknown)} not supported (this engine "
                          f"takes {', '.join(sorted(known))})")  # fmt: skip
    method = cfg.get("method", "mtp")
    if method not in SPEC_METHODS:
        raise Qwen35Error(f"--speculative-config: method {method!r} is not supported (mtp: the "
                          "checkpoint's MTP head, or ngram)")  # fmt: skip
    args.speculative_method = SPEC_METHODS[method]
    for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
        if key in cfg:
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool):
                raise Qwen35Error(f"--speculative-config: {key} must be an integer")
            setattr(args, key, cfg[key])


def gpu_memory(fraction: float, device: str, max_memory: str | None) -> str:
    """--max-memory (bytes, as text) for --gpu-memory-utilization `fraction` on `device`."""
    if max_memory is not None:
        raise Qwen35Error("give --gpu-memory-utilization or --max-memory, not both")
    if not 0 < fraction <= 1:
        raise Qwen35Error(f"--gpu-memory-utilization must be in (0, 1], got {fraction}")
    if not str(device).startswith("cuda"):
        raise Qwen35Error("--gpu-memory-utilization is a GPU's share (--device cuda); on a CPU "
                          "give --max-memory (e.g. 16GiB)")  # fmt: skip
    import torch

    if not torch.cuda.is_available():
        raise Qwen35Error("--gpu-memory-utilization: no CUDA device is available")
    free, total = torch.cuda.mem_get_info(torch.device(device))
    want = int(total * fraction)
    if want > free:  # (as vLLM: the share must be free when the server starts)
        raise Qwen35Error(
            f"--gpu-memory-utilization {fraction}: {want / 2**30:.1f} GiB of {device}'s "
            f"{total / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB are free (other processes "
            "hold the rest): lower it, or free the GPU"
        )
    return str(want)
