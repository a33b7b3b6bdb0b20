"""Engine and sampling options shared by `generate`, `chat`, `serve` and `bench`."""

from __future__ import annotations

import argparse


def add_engine_arguments(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        required=model_required,
        help="model directory, Hub id (Qwen/Qwen3.5-0.8B) or, with --load-format random, a catalog name",
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "random"],
        help="'random': random weights from the config (benchmarks only)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="weights and compute dtype (auto: bf16 on a GPU or a CPU with native bf16 - AMX / AVX512-BF16 - else fp32)",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=32, help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument(
        "--max-memory",
        default=None,
        help="memory for weights + caches + working memory, e.g. 8GiB (CPU default: 2 GiB of caches)",
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    g.add_argument(
        "--prefix-cache-memory",
        default=None,
        help="memory for prefix-cache DeltaNet state checkpoints (default: a quarter of the cache budget)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def engine_kwargs(args: argparse.Namespace) -> dict:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return dict(
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        max_memory=args.max_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        prefix_cache_memory=args.prefix_cache_memory,
        load_format=args.load_format,
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=20)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from qwen35.request import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        seed=args.seed,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
    ).validate()
