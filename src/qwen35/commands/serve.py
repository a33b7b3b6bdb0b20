"""`qwen35 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys

from qwen35.commands import vllm_flags
from qwen35.commands.common import add_engine_arguments, engine_on_its_thread, require_file
from qwen35.errors import Qwen35Error

# --max-decode-step-ms under `serve`: on a 2-core CPU this keeps a stream's longest wait behind
# a 4,096-token prompt at ~1 s (Qwen3.5-0.8B; 3.8 s unpaced) / ~1.6 s (4B; 19 s unpaced), and a
# short request arriving meanwhile starts in ~1 s (4 s / 20 s), for 14% / 25% more time to the
# long prompt's first token (bench/decode_stalls.py)
SERVE_DECODE_STEP_MS = 1000.0


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
    vllm_flags.add_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model id clients send as `model` (default: --model as given); several "
                        "names: any is accepted, replies carry the first (e.g. the names an "
                        "Anthropic client sends)")  # fmt: skip
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a request's own `chat_template` (vLLM's flag; jinja runs "
                        "sandboxed, but a template can loop for long); without it such a "
                        "request is a 400")  # fmt: skip
    g.add_argument("--api-key", default=os.environ.get("QWEN35_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health "
                        "(default: $QWEN35_API_KEY)")  # fmt: skip
    g.add_argument("--max-queue", type=int, default=None,
                   help="sequences (prompts x n) that may wait for a running slot; a request "
                        "that would exceed it gets 503 + Retry-After (>= 1; default: no limit)")  # fmt: skip
    g.add_argument("--max-stored-responses", type=int, default=256,
                   help="/v1/responses kept in memory for previous_response_id and GET "
                        "/v1/responses/ID, least recently used dropped (0: none; default: 256)")  # fmt: skip
    g.add_argument("--max-body-bytes", type=_size, default=16 << 20,
                   help="largest request body accepted, else 413 (default: 16MiB)")  # fmt: skip
    g.add_argument("--ssl-certfile", default=None,
                   help="serve HTTPS with this PEM certificate (chain); needs --ssl-keyfile")  # fmt: skip
    g.add_argument("--ssl-keyfile", default=None,
                   help="the PEM private key of --ssl-certfile (unencrypted)")  # fmt: skip
    g.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="web pages (scheme://host[:port], or * for any) whose scripts may call "
                        "the API from a browser (CORS; default: none)")  # fmt: skip
    lim = p.add_argument_group("per-request limits (a request over one gets a 400)")
    lim.add_argument("--max-seqs-per-request", type=int, default=128,
                     help="cap on n, on prompts per completions batch, and on prompts x n "
                          "(default: 128)")  # fmt: skip
    lim.add_argument("--max-stop", type=int, default=16,
                     help="stop strings, and stop_token_ids, per request (default: 16; OpenAI "
                          "allows 4)")  # fmt: skip
    lim.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="prompt tokens per request (default: the model's context)")  # fmt: skip
    t = p.add_argument_group("connections")
    t.add_argument("--max-connections", type=int, default=1024,
                   help="open connections; past it new ones get 503 and are closed "
                        "(default: 1024, lowered to fit the open-files limit)")  # fmt: skip
    t.add_argument("--timeout-headers", type=float, default=10.0,
                   help="seconds for a request's line and headers to arrive (default: 10)")  # fmt: skip
    t.add_argument("--timeout-body", type=float, default=60.0,
                   help="seconds for a whole request body to arrive (default: 60)")  # fmt: skip
    t.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default: 5)")  # fmt: skip
    t.add_argument("--timeout-write", type=float, default=60.0,
                   help="seconds a client may stop reading a response before it is dropped "
                        "(default: 60)")  # fmt: skip
    g.add_argument("--seed", type=int, default=None,
                   help="seed for requests without their own (reproducible runs; default random)")  # fmt: skip
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip


def _fit_open_files(max_connections: int) -> int:
    """Raise the soft open-files limit toward what max_connections needs (+64 for the model's
    files and logs); if the hard limit is lower, serve fewer connections and say so."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max(1, soft - 64)
        print(f"note: the open-files limit is {soft}; serving at most {fitted} connections",
              file=sys.stderr)  # fmt: skip
        return fitted
    return max_connections


def _listen_socket(host: str, port: int):
    """The server's socket, bound now: an address in use or not on this machine is refused
    before the model loads, not after (uvicorn would bind only once the engine is up)."""
    import socket

    # as uvicorn binds: IPv6 for an address with a colon, else IPv4 (so "localhost" is 127.0.0.1)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            hint = "another server listens there: stop it or pick another --port"
        else:
            hint = "check --host (an address or name of this machine) and --port"
        raise Qwen35Error(f"cannot listen on {host}:{port}: {e.strerror or e}; {hint}") from None
    return sock


def _check_tls(certfile: str | None, keyfile: str | None) -> bool:
    """True to serve HTTPS; the pair is loaded once here so that a wrong file is refused
    before the model loads (uvicorn loads it again when it starts)."""
    if certfile is None and keyfile is None:
        return False
    if certfile is None or keyfile is None:
        raise Qwen35Error("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    import ssl

    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        require_file(flag, path)
    try:
        # an encrypted key gets an empty password: refused (uvicorn could not decrypt it either),
        # not a pass-phrase prompt on a terminal
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise Qwen35Error(
            f"cannot use --ssl-certfile {certfile} with --ssl-keyfile {keyfile}: {e}; give a PEM "
            "certificate and its unencrypted PEM private key"
        ) from None
    return True


def run(args: argparse.Namespace) -> int:
    vllm_flags.apply(args)  # (vLLM's flags mapped onto this engine's options)
    if not 0 <= args.port <= 65535:
        raise Qwen35Error(f"--port must be in [0, 65535], got {args.port}")
    https = _check_tls(args.ssl_certfile, args.ssl_keyfile)
    from qwen35.server.limits import RequestLimits
    from qwen35.server.transport import TransportLimits

    # check every server option before the model loads
    limits = RequestLimits(
        max_seqs_per_request=args.max_seqs_per_request,
        max_stop=args.max_stop,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    transport = TransportLimits(
        max_connections=args.max_connections,
        timeout_headers_s=args.timeout_headers,
        timeout_body_s=args.timeout_body,
        timeout_keep_alive_s=args.timeout_keep_alive,
        timeout_write_s=args.timeout_write,
    )
    from qwen35.server.app import ServerConfig, create_app

    if args.enable_lora:
        print(
            "warning: --enable-lora lets every client "
            + ("holding the API key " if args.api_key else "")
            + "load LoRA adapters from paths (or Hub ids) it names, through "
            "/v1/load_lora_adapter: serve it on a trusted network"
            + ("" if args.api_key else ", or set --api-key"),
            file=sys.stderr,
        )
    names = args.served_model_name or [args.model]
    config = ServerConfig(
        served_model_name=names[0],
        model_aliases=tuple(dict.fromkeys(n for n in names[1:] if n != names[0])),
        trust_request_chat_template=args.trust_request_chat_template,
        model_path=args.model,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        limits=limits,
        max_stored_responses=args.max_stored_responses,
        allowed_origins=tuple(args.allowed_origins),
    )
    transport = dataclasses.replace(
        transport, max_connections=_fit_open_files(transport.max_connections)
    )
    from qwen35.parallel.group import torchrun_env

    # bound before the model loads (minutes, for a big one); under torchrun only rank 0 serves
    # HTTP (the other ranks become workers inside LLMEngine and exit there)
    ranked = torchrun_env()
    sock = _listen_socket(args.host, args.port) if ranked is None or ranked[0] == 0 else None
    from qwen35.server.transport import run_server, uvicorn_config

    if args.max_decode_step_ms is None:  # streams in flight: pace prompt chunks (prefill_pacer)
        args.max_decode_step_ms = SERVE_DECODE_STEP_MS
    try:
        thread, engine = engine_on_its_thread(args, seed=args.seed)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    assert sock is not None  # (a worker rank has exited inside LLMEngine)
    if engine.workers is not None:
        # a dead tensor-parallel worker: shut the server down (uvicorn handles SIGTERM) and
        # exit non-zero below, rather than answer 503 forever
        import signal

        engine.workers.on_failure = lambda _msg: os.kill(os.getpid(), signal.SIGTERM)
    app = create_app(engine, config, thread)
    port = sock.getsockname()[1]  # (--port 0: the one the system chose)
    host = f"[{args.host}]" if ":" in args.host else args.host
    if engine.pacer.target_s:
        print(f"prompt chunks paced to ~{engine.pacer.target_s * 1000:.0f} ms a step while "
              "sequences decode, short prompts taken beside long ones (--max-decode-step-ms; 0: "
              "off)", file=sys.stderr)  # fmt: skip
    print(
        f"serving {' / '.join(names)} (context {engine.max_model_len} tokens) on "
        f"{'https' if https else 'http'}://{host}:{port}"
        f"/v1{' (API key required)' if config.api_key else ''}",
        file=sys.stderr,
    )
    # on shutdown, streams still open after 5 s are cancelled (and their requests aborted);
    # exit status 1 when the engine loop died, so a supervisor restarts the server
    tls = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile} if https else {}
    cfg = uvicorn_config(
        app, transport, host=args.host, port=port, log_level=args.log_level, **tls,
        access_log=not args._vllm_disable_log_requests,  # (vLLM's --disable-log-requests)
    )  # fmt: skip
    try:
        status = run_server(app, cfg, sockets=[sock])
    finally:
        sock.close()
        engine.shutdown()
    if engine.workers is not None and engine.workers.failure is not None:
        print(f"error: {engine.workers.failure}", file=sys.stderr)
        return 1
    return status
