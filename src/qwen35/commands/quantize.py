"""`qwen35 quantize IN_DIR OUT_DIR --to fp8 | bf16 | int4 | int8 [--lora ADAPTER_DIR]` (see
qwen35.quant.checkpoint)."""

from __future__ import annotations

import argparse
import math
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("in_dir", help="model directory (config.json + safetensors), or a llama.cpp "
                   "GGUF file or Ollama model, ollama:NAME (written as a safetensors "
                   "checkpoint)")  # fmt: skip
    p.add_argument("out_dir", help="directory to write (must not exist unless --force)")
    p.add_argument(
        "--to",
        choices=("fp8", "bf16", "int4", "int8"),
        default="fp8",
        help="fp8: the official block-FP8 layout (e4m3, 128x128 BF16 scales); bf16: dequantise; "
        "int4 / int8: compressed-tensors' pack-quantized layout (4 bits in groups of 128 with "
        "zero points / 8 bits per channel), which this engine keeps as stored on a CPU and "
        "vLLM / SGLang load",
    )
    p.add_argument(
        "--lora",
        metavar="ADAPTER_DIR",
        help="merge this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) "
        "into the weights first",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument(
        "--shard-size", type=float, default=4.0, help="largest safetensors shard in GiB (4)"
    )


def run(args: argparse.Namespace) -> int:
    from qwen35.errors import Qwen35Error
    from qwen35.quant.checkpoint import convert_checkpoint

    if not 0 < args.shard_size < math.inf:  # (nan / inf: a ValueError / OverflowError below)
        raise Qwen35Error(f"--shard-size must be a positive number of GiB, got {args.shard_size}")
    out = convert_checkpoint(
        args.in_dir,
        args.out_dir,
        to=args.to,
        force=args.force,
        shard_bytes=int(args.shard_size * 2**30),
        progress=sys.stderr.isatty(),
        lora=args.lora,
    )
    print(f"wrote {out} ({args.to}{', LoRA ' + args.lora + ' merged' if args.lora else ''})")
    return 0
