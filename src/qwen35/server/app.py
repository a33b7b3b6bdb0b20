"""The OpenAI-compatible HTTP app: `create_app(engine, ServerConfig(...))` -> FastAPI.

Routes: GET /health, GET /metrics, GET /v1/models (and /v1/models/{id}), POST /v1/completions,
POST /v1/chat/completions, POST /v1/responses (OpenAI's Responses API), POST /v1/messages and
/v1/messages/count_tokens (Anthropic's Messages API: serving_messages.py), and vLLM's POST
/tokenize, POST /detokenize, GET /tokenizer_info, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (serving_lora.py), POST /reset_prefix_cache (and SGLang's /flush_cache),
and Ollama's POST /api/chat, /api/generate, /api/show,
GET /api/tags, /api/ps, /api/version (serving_ollama.py). Every error is returned in OpenAI's
shape (Anthropic's on /v1/messages..., Ollama's `{"error": ...}` on /api/...). One pure-ASGI
middleware gives each request an id (`x-request-id`), counts requests by endpoint/status, checks the API
key (everything but /health) and turns any unexpected exception into a 500 with a generic
message and the request id (the traceback goes to the log only); it is pure ASGI (not
BaseHTTPMiddleware) so streaming and disconnect detection are untouched. With
`allowed_origins` (`--allowed-origins`), Starlette's CORSMiddleware sits outside it.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen35.engine.engine_thread import EngineThread
from qwen35.errors import shown
from qwen35.server import (
    serving_lora,
    serving_messages,
    serving_ollama,
    serving_responses,
    serving_tokens,
)
from qwen35.server.async_engine import AsyncEngine, EngineDeadError
from qwen35.server.metrics import CONTENT_TYPE, ServerMetrics
from qwen35.server.protocol import APIError, ModelCard, ModelList, error_body
from qwen35.server.serving_chat import create_chat_completion
from qwen35.server.serving_common import (
    RETRY_AFTER,
    JSONResponse,
    ServerConfig,
    ServerState,
    engine_dead_error,
    internal_error_body,
)
from qwen35.server.serving_completions import create_completion

log = logging.getLogger("qwen35.server")

ENDPOINTS = (
    "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
    "/v1/responses", "/tokenize", "/detokenize", "/tokenizer_info", "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter", "/v1/messages", "/v1/messages/count_tokens", "/api/chat",
    "/api/generate", "/api/show", "/api/tags", "/api/ps", "/api/version", "/reset_prefix_cache",
    "/flush_cache",
)  # fmt: skip
OPEN_PATHS = ("/health",)  # no API key needed (load balancers probe it)

__all__ = ["ServerConfig", "ServerState", "create_app"]


def create_app(engine: Any, config: ServerConfig, thread: EngineThread | None = None) -> FastAPI:
    """An app serving `engine` (an LLMEngine). Its loop runs while the app's lifespan does, on
    `thread` (the EngineThread that built the engine: engine/engine_thread.py) or a new one."""
    async_engine = AsyncEngine(engine, max_queue=config.max_queue, thread=thread)
    metrics = ServerMetrics(lambda: async_engine.stats, lambda: async_engine.alive)
    state = ServerState(engine, async_engine, metrics, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwen35", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.qwen35 = state
    app.add_middleware(_GuardMiddleware, state=state)
    if config.allowed_origins:
        # outside the guard (added last): a browser's preflight OPTIONS carries no API key and
        # is answered here; the guard's own answers (401, 500) still get the CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "retry-after"],
        )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        # handlers parse bodies themselves (serving_common.read_json); this is a safety net
        first = (e.errors() or [{}])[0]
        return JSONResponse(error_body(f"invalid request: {first.get('msg', e)}"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        detail = str(e.detail)
        path = request.url.path
        if e.status_code == 404 and path.startswith("/api/"):  # (Ollama's other endpoints)
            detail = (f"{path} is not served here: qwen35 serves one model (POST /api/chat, "
                      "/api/generate, /api/show; GET /api/tags, /api/ps, /api/version); pull, "
                      "create, copy, delete and embed belong to Ollama itself")  # fmt: skip
        body = _shaped(path, error_body(detail, kind), "invalid_request_error")
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


# The route handlers find the server's state on the app (`request.app.state.qwen35`), not in a
# closure: FastAPI caches what it learns of each endpoint function in module-level lru_caches,
# which kept every app's engine alive for the life of the process (a test process serving
# many apps grew by an engine each).
def _state(request: Request) -> ServerState:
    return request.app.state.qwen35


async def health(request: Request) -> Response:
    async_engine = _state(request).async_engine
    if async_engine.alive:
        return JSONResponse({"status": "ok"})
    msg = async_engine._dead_message()  # generic: the error itself is in the log only
    body = error_body(msg, "server_error", code="engine_dead")
    return JSONResponse(body, 503, headers=RETRY_AFTER)


async def prometheus(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _cards(state: ServerState) -> list[ModelCard]:
    root = state.config.served_model_name  # never the server's filesystem path
    ctx = getattr(state.engine, "max_model_len", None)
    cards = [ModelCard(id=n, root=root, max_model_len=ctx) for n in state.model_names]
    return cards + serving_lora.lora_cards(state)  # LoRA adapters: models of their own


async def models(request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=_cards(_state(request))).model_dump())


async def model(request: Request, model_id: str) -> JSONResponse:
    """GET /v1/models/{id} (OpenAI's `models.retrieve`): the card, or a 404."""
    card = next((c for c in _cards(_state(request)) if c.id == model_id), None)
    if card is None:
        raise APIError(f"The model `{shown(model_id, 100)}` does not exist", 404,
                       "invalid_request_error", "model", "model_not_found")  # fmt: skip
    return JSONResponse(card.model_dump())


def _with_state(serve):
    """The route handler of `serve(state, request)` (a serving module's coroutine)."""

    async def handler(request: Request) -> Response:
        return await serve(_state(request), request)

    handler.__name__ = serve.__name__
    return handler


async def get_response(request: Request, response_id: str) -> Response:
    return JSONResponse(serving_responses.stored_response(_state(request), response_id))


async def delete_response(request: Request, response_id: str) -> Response:
    state = _state(request)
    return JSONResponse(serving_responses.stored_response(state, response_id, delete=True))


async def tokenizer_info(request: Request) -> Response:
    return JSONResponse(serving_tokens.tokenizer_info(_state(request)))


async def reset_prefix_cache(request: Request) -> Response:
    """POST /reset_prefix_cache (vLLM's; `?reset_external=true` also empties --prefix-cache-dir's
    folder of this model) and POST /flush_cache (SGLang's): forget the cached prefixes between
    benchmark runs (AIPerf's reset hook calls either). Requests running keep what they hold."""
    state = _state(request)
    flag = request.query_params.get("reset_external", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise APIError(f"reset_external must be true or false, got {shown(flag, 40)!r}", 400,
                       param="reset_external")  # fmt: skip
    try:
        removed = await state.async_engine.call(state.engine.reset_prefix_cache,
                                                flag in ("true", "1"))  # fmt: skip
    except EngineDeadError as e:
        raise engine_dead_error(e) from None
    more = f"; {removed} files removed from the prefix cache's folder" if removed else ""
    return Response(f"Success: prefix cache reset{more}.\n", media_type="text/plain")


async def root(request: Request) -> Response:
    """GET /: a plain line, as Ollama answers it (clients probe a server with it)."""
    return Response("qwen35 is running\n", media_type="text/plain")


ROUTES = (
    ("GET", "/", root),
    ("GET", "/health", health),
    ("GET", "/metrics", prometheus),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{model_id:path}", model),
    ("POST", "/v1/completions", _with_state(create_completion)),
    ("POST", "/v1/chat/completions", _with_state(create_chat_completion)),
    ("POST", "/v1/responses", _with_state(serving_responses.create_response)),
    ("POST", "/v1/messages", _with_state(serving_messages.create_message)),
    ("POST", "/v1/messages/count_tokens", _with_state(serving_messages.count_tokens)),
    ("GET", "/v1/responses/{response_id}", get_response),
    ("DELETE", "/v1/responses/{response_id}", delete_response),
    ("POST", "/v1/load_lora_adapter", _with_state(serving_lora.load_lora_adapter)),
    ("POST", "/v1/unload_lora_adapter", _with_state(serving_lora.unload_lora_adapter)),
    ("POST", "/reset_prefix_cache", reset_prefix_cache),
    ("POST", "/flush_cache", reset_prefix_cache),
    ("POST", "/tokenize", _with_state(serving_tokens.tokenize)),
    ("POST", "/detokenize", _with_state(serving_tokens.detokenize)),
    ("GET", "/tokenizer_info", tokenizer_info),
    ("POST", "/api/chat", _with_state(serving_ollama.chat)),
    ("POST", "/api/generate", _with_state(serving_ollama.generate)),
    ("POST", "/api/show", _with_state(serving_ollama.show)),
    ("GET", "/api/tags", _with_state(serving_ollama.tags)),
    ("GET", "/api/ps", _with_state(serving_ollama.ps)),
    ("GET", "/api/version", _with_state(serving_ollama.version)),
)


class _GuardMiddleware:
    """Request ids, counts by endpoint and status, 401 without a valid bearer key, and a generic
    500 for any exception that escapes a handler."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = 500  # if the app dies before answering
        started = False
        request_id = "req-" + uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            key = self.state.config.api_key
            if key and path not in OPEN_PATHS and not _authorized(scope, key):
                body = error_body(
                    "invalid or missing API key: send `Authorization: Bearer <key>` (or "
                    "`x-api-key: <key>`)",
                    code="invalid_api_key",
                )
                await _send_json(send_counted, 401, _shaped(path, body, "authentication_error"),
                                 {"www-authenticate": "Bearer"})  # fmt: skip
                return
            await self.app(scope, receive, send_counted)
        except Exception:
            log.exception("internal error (request id %s, %s)", request_id, path)
            if not started:  # else the connection is cut; the client sees an incomplete reply
                body = _shaped(path, internal_error_body(request_id), "api_error")
                await _send_json(send_counted, 500, body, {})
        finally:
            self.state.metrics.requests.labels(endpoint, str(status)).inc()


def _shaped(path: str, body: dict, anthropic_type: str) -> dict:
    """An OpenAI-shaped error body, in Anthropic's shape on its endpoints (/v1/messages...),
    Ollama's on its own (/api/...)."""
    if path.startswith("/api/"):
        return {"error": body["error"]["message"]}
    if not path.startswith("/v1/messages"):
        return body
    return {"type": "error", "error": {"type": anthropic_type, "message": body["error"]["message"]}}


def _authorized(scope: Scope, key: str) -> bool:
    """`Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>` (Anthropic's)."""
    # compared as bytes: hmac.compare_digest refuses str with non-ASCII characters
    expected = key.encode("utf-8")
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected):
                return True
        elif name == b"x-api-key" and hmac.compare_digest(value.strip(), expected):
            return True
    return False


async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})
