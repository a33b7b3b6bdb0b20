"""`qwen35 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine."""

from __future__ import annotations

import argparse
import os
import sys

from qwen35.commands.common import add_engine_arguments, engine_config
from qwen35.errors import Qwen35Error


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}  # fmt: skip
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        value = int(float(num) * units[t[len(num) :]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (e.g. 1048576, 512KiB, 16MiB)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="model id clients send as `model` (default: --model as given)")  # fmt: skip
    g.add_argument("--api-key", default=os.environ.get("QWEN35_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health "
                        "(default: $QWEN35_API_KEY)")  # fmt: skip
    g.add_argument("--max-queue", type=int, default=None,
                   help="answer 503 while this many requests wait (default: unlimited)")  # fmt: skip
    g.add_argument("--max-body-bytes", type=_size, default=16 << 20,
                   help="largest request body accepted, else 413 (default: 16MiB)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise Qwen35Error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue is not None and args.max_queue < 0:
        raise Qwen35Error(f"--max-queue must be >= 0, got {args.max_queue}")
    import uvicorn

    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.server.app import ServerConfig, create_app

    engine = LLMEngine(
        args.model, engine_config(args, seed=args.seed), progress=sys.stderr.isatty()
    )
    name = args.served_model_name or args.model
    config = ServerConfig(
        served_model_name=name,
        model_path=args.model,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
    )
    if engine.workers is not None:
        # a dead tensor-parallel worker: shut the server down (uvicorn handles SIGTERM) and
        # exit non-zero below, rather than answer 503 forever
        import signal

        engine.workers.on_failure = lambda _msg: os.kill(os.getpid(), signal.SIGTERM)
    app = create_app(engine, config)
    print(
        f"serving {name} (context {engine.max_model_len} tokens) on http://{args.host}:{args.port}"
        f"/v1{' (API key required)' if config.api_key else ''}",
        file=sys.stderr,
    )
    # on shutdown, streams still open after 5 s are cancelled (and their requests aborted)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.shutdown()
    if engine.workers is not None and engine.workers.failure is not None:
        print(f"error: {engine.workers.failure}", file=sys.stderr)
        return 1
    return 0
