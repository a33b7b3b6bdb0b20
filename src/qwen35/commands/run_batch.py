"""`qwen35 run-batch -i IN.jsonl -o OUT.jsonl --model M`: an offline batch in the OpenAI Batch
API's file format, as vLLM's `run-batch` (server/batch.py has the format)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

from qwen35.commands.common import add_engine_arguments, engine_on_its_thread, require_file
from qwen35.errors import Qwen35Error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input-file", required=True, metavar="IN.jsonl",
                   help="requests, one JSON object a line (custom_id, method, url, body); "
                        "- reads standard input")  # fmt: skip
    p.add_argument("-o", "--output-file", required=True, metavar="OUT.jsonl",
                   help="results, one a line in input order (written to a temporary name and "
                        "renamed when the batch is done); - writes standard output")  # fmt: skip
    add_engine_arguments(p)
    g = p.add_argument_group("batch")
    g.add_argument("--served-model-name", default=None,
                   help="model id the requests' `model` may name (default: --model as given)")  # fmt: skip
    g.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="requests in flight at once (default: 4 x the sequences the engine runs at once)")  # fmt: skip
    g.add_argument("--seed", type=int, default=None,
                   help="seed for requests without their own (reproducible runs; default random)")  # fmt: skip


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse unusable files before the model loads (minutes, for a big one)."""
    src, dst = args.input_file, args.output_file
    if src != "-":
        require_file("--input-file", src)
    if dst == "-":
        return
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise Qwen35Error(f"--output-file {dst}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise Qwen35Error(f"--output-file {dst}: folder {folder} is not writable")
    if src != "-" and os.path.exists(dst) and os.path.samefile(src, dst):
        raise Qwen35Error("--output-file must not be the input file")


def run(args: argparse.Namespace) -> int:
    _check_paths(args)
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise Qwen35Error(
            f"--max-concurrent-requests must be >= 1, got {args.max_concurrent_requests}"
        )
    from qwen35.server.app import ServerConfig, create_app

    thread, engine = engine_on_its_thread(args, seed=args.seed)
    try:
        config = ServerConfig(served_model_name=args.served_model_name or args.model,
                              model_path=args.model)  # fmt: skip
        app = create_app(engine, config, thread)
        window = args.max_concurrent_requests or 4 * engine.plan.num_state_slots
        return asyncio.run(_run(app, args.input_file, args.output_file, window))
    finally:
        engine.shutdown()


async def _run(app, src: str, dst: str, window: int) -> int:
    from qwen35.server.batch import run_batch

    state = app.state.qwen35
    started = time.perf_counter()
    last_report = [started]

    def report(counts, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - last_report[0] < 10:
            return
        last_report[0] = now
        done = counts.completed + counts.failed
        print(f"run-batch: {done} done ({counts.completed} completed, {counts.failed} failed), "
              f"{done / max(now - started, 1e-9):.2f} requests/s", file=sys.stderr)  # fmt: skip

    inp = sys.stdin if src == "-" else open(src, encoding="utf-8", errors="replace")
    if dst == "-":
        out, tmp = sys.stdout, None
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.",
                                   dir=os.path.dirname(os.path.abspath(dst)))  # fmt: skip
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # (mkstemp's 0600 would stick after the rename)
        out = os.fdopen(fd, "w", encoding="utf-8")
    try:
        async with app.router.lifespan_context(app):

            def on_result(result: dict, so_far) -> None:
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
                report(so_far)

            counts = await run_batch(app, inp, window, on_result)
            alive = state.async_engine.alive
        out.flush()
        if tmp is not None:
            os.fsync(out.fileno())
            out.close()
            os.replace(tmp, dst)
            tmp = None
    finally:
        if inp is not sys.stdin:
            inp.close()
        if tmp is not None:  # interrupted: nothing half-written is left behind
            out.close()
            os.unlink(tmp)
    report(counts, final=True)
    where = "standard output" if dst == "-" else dst
    print(f"run-batch: {counts.total} requests -> {where} in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)  # fmt: skip
    if not alive:
        print("error: the engine stopped during the batch; the requests after it failed with 503 "
              "(engine_dead): see the log above", file=sys.stderr)  # fmt: skip
        return 1
    return 0
