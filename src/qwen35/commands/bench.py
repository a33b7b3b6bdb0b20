"""`qwen35 bench`: our engine vs transformers on the same random-weight model, in one run.

Argument parsing and dispatch only; the workloads live in `qwen35.benchmarks` (imported when
the command runs, so `qwen35 --help` stays light).
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen35.benchmarks import WORKLOADS  # (constants only: no torch)
from qwen35.errors import Qwen35Error

WORKLOAD_CHOICES = ("all", *WORKLOADS)


def _contexts(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x.strip().lower().replace("k", "000")) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--contexts {text!r}: write token counts separated by commas, e.g. 1024,8192"
        ) from None
    if not vals or any(v < 2 for v in vals):
        raise argparse.ArgumentTypeError("--contexts needs token counts of at least 2")
    return vals


def _batches(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batches {text!r}: write sequence counts separated by commas, e.g. 4,16"
        ) from None
    if not vals or any(v < 1 or v > 256 for v in vals):
        raise argparse.ArgumentTypeError("--batches takes sequence counts from 1 to 256")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=WORKLOAD_CHOICES,
        default="all",
        help="which benchmark (default: all): decode = batch-1 tokens/s vs the bandwidth "
        "roofline; throughput = 32 mixed requests; long-context = decode step time at 1K/8K/32K, "
        "hybrid vs all-full-attention; multi-turn = prefix caching on vs off; dtype = our "
        "engine in fp32 vs bf16; structured = decode steps with every row under a JSON schema "
        "vs none at batch 32, and schema compile time; vision = encoder images/s and TTFT of a "
        "chat with one 1024x1024 image; quality = fp8/int8/int4 vs bf16 (top-1 agreement, KL); "
        "peers = each weight format vs llama.cpp; tp = tokens/s of one process vs "
        "--tensor-parallel-size ranks (default 2) on the same weights; spec = batch-1 decode "
        "with MTP drafts (and oracle drafts at 100/80/60%% acceptance) vs plain; serve = "
        "streamed completions through `qwen35 serve` (TTFT, TPOT, ITL, throughput) vs the engine "
        "without HTTP, or through any server with --base-url (only decode, throughput, "
        "long-context and multi-turn are part of all)",
    )
    p.add_argument(
        "--model",
        default="Qwen3.5-0.8B",
        help="catalog name or config.json path (random weights), or a model directory with "
        "safetensors (its weights); default Qwen3.5-0.8B",
    )
    from qwen35.engine.config import EngineConfig

    # the engine's own flags, declared once in EngineConfig (both engines use them here)
    # -tp N: decode runs our engine on N ranks; tp compares one process with N ranks
    EngineConfig.add_cli_arguments(
        p,
        only=("dtype", "device", "threads", "tensor_parallel_size", "enable_expert_parallel"),
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a fast check, not a measure")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--contexts",
        type=_contexts,
        default=None,
        help="long-context sizes, comma-separated (default 1024,8192,32768; quick 64,256)",
    )
    p.add_argument("--requests", type=int, default=None,
                   help="throughput and serve workloads: requests (default 32)")
    p.add_argument(
        "--hf-batch-size", type=int, default=8, help="transformers' static batch size (default 8)"
    )
    p.add_argument("--rounds", type=int, default=None, help="decode rounds (default 3)")
    p.add_argument(
        "--formats",
        default=None,
        help="peers workload: our weight formats, comma-separated (default fp32,bf16,int8,int4,"
        "fp8; each with its llama.cpp twin)",
    )
    p.add_argument(
        "--batches",
        type=_batches,
        default=None,
        help="peers and decode workloads: also batched decode, B sequences decoding together "
        "(total tok/s; peers: ours vs llama.cpp's parallel sequences), for each B, "
        "comma-separated, e.g. 4,16 (default: none)",
    )
    p.add_argument(
        "--scheduler-steps",
        type=int,
        default=1,
        metavar="K",
        help="decode workload: our engine runs K decode steps per scheduling round "
        "(--num-scheduler-steps, multi-step decoding; default 1)",
    )
    p.add_argument(
        "--draft-tokens",
        default=None,
        help="spec workload: drafts a step of each drafting engine, comma-separated (default "
        "1,3); tp workload: K, both engines also with K drafts (an oracle right 80%%)",
    )
    g = p.add_argument_group("serve workload")
    g.add_argument("--base-url", default=None,
                   help="load this running OpenAI-compatible server (qwen35 serve, vLLM, SGLang, "
                        "llama-server; e.g. http://127.0.0.1:8000) instead of our own: no model "
                        "is loaded here")  # fmt: skip
    g.add_argument("--served-model-name", default=None,
                   help="with --base-url: the `model` to request (default: the first the server "
                        "lists)")  # fmt: skip
    g.add_argument("--api-key", default=None, help="with --base-url: a bearer key")
    g.add_argument("--input-len", type=int, default=None,
                   help="prompt tokens, +-25%% (default 256; quick 16)")  # fmt: skip
    g.add_argument("--output-len", type=int, default=None,
                   help="tokens generated per request (default 64; quick 4)")  # fmt: skip
    g.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")  # fmt: skip
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the JSON document, not tables")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")


def run(args: argparse.Namespace) -> int:
    import logging

    from qwen35.benchmarks import ALL
    from qwen35.benchmarks.common import BenchOptions
    from qwen35.benchmarks.runner import run_bench

    for name in ("threads", "requests", "rounds", "hf_batch_size"):
        val = getattr(args, name)
        if val is not None and val < 1:
            raise Qwen35Error(f"--{name.replace('_', '-')} must be at least 1, got {val}")
    say = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if not args.json else None
    opts = BenchOptions(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        quick=args.quick,
        baseline=not args.no_baseline,
        seed=args.seed,
        contexts=args.contexts,
        requests=args.requests,
        hf_batch_size=args.hf_batch_size,
        rounds=args.rounds,
        formats=tuple(args.formats.split(",")) if args.formats else None,
        batches=args.batches,
        draft_tokens=_draft_tokens(args.draft_tokens),
        scheduler_steps=args.scheduler_steps,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        progress=say,
    )
    if args.base_url is not None:
        return _run_external(args, opts)
    workloads = list(ALL) if args.workload == "all" else [args.workload]
    if "peers" in workloads:  # a typo must not cost the minutes of loading the model first
        from qwen35.benchmarks.peers import check_formats

        check_formats(opts.formats)
    # random-weight and cache-plan notices would interleave with the tables
    logging.getLogger("qwen35").setLevel(logging.ERROR)
    con = None
    if not args.json:
        from rich.console import Console

        con = Console()

    def on_workload(doc: dict, key: str) -> None:
        # long runs: each table (and the JSON so far) as soon as its workload ends
        _save(doc, args.out)
        if con is not None:
            from qwen35.benchmarks.report import print_header, print_workload

            if len(doc["workloads"]) == 1:
                print_header(doc, con)
            print_workload(doc, key, con)

    doc = run_bench(opts, workloads, progress=say, on_workload=on_workload)
    _save(doc, args.out)
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


def _save(doc: dict, path: str | None) -> None:
    """--out: the JSON document so far."""
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")


def _run_external(args: argparse.Namespace, opts) -> int:
    """`--workload serve --base-url URL`: the load client alone against a running server."""
    from qwen35.benchmarks import SCHEMA
    from qwen35.benchmarks.serving import run_external, sizes

    if args.workload != "serve":
        raise Qwen35Error("--base-url measures a running server: use it with --workload serve")
    if not args.base_url.startswith(("http://", "https://")):
        raise Qwen35Error(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    result = run_external(args.base_url, sizes(opts), args.served_model_name, args.api_key)
    doc = {"schema": SCHEMA, "workloads": {"serve": result}}
    _save(doc, args.out)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        from rich.console import Console

        from qwen35.benchmarks.report import print_workload

        print_workload(doc, "serve", Console())
    return 0


def _draft_tokens(text: str | None) -> tuple[int, ...] | None:
    from qwen35.cache_spec import MAX_SPECULATIVE_TOKENS

    if not text:
        return None
    try:
        ks = tuple(int(x) for x in text.split(","))
    except ValueError:
        ks = ()
    if not ks or any(not 1 <= k <= MAX_SPECULATIVE_TOKENS for k in ks):
        raise Qwen35Error(
            f"--draft-tokens takes numbers 1 .. {MAX_SPECULATIVE_TOKENS}, comma-separated, got {text!r}"
        )
    return ks
