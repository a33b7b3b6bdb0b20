"""What the chat and completions handlers share: server state, body parsing, engine-error
mapping, logprob formatting, SSE framing and clean-up when a client goes away."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParamsError, TokenLogprob
from qwen35.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
)
from qwen35.server.metrics import ServerMetrics
from qwen35.server.protocol import APIError


@dataclass
class ServerConfig:
    served_model_name: str
    model_path: str | None = None  # also accepted as `model` in requests
    api_key: str | None = None
    max_queue: int | None = None  # waiting requests beyond which requests get 503
    max_body_bytes: int = 16 * 1024 * 1024
    disconnect_poll_s: float = 0.5  # how often non-streaming handlers check for a gone client


@dataclass
class ServerState:
    engine: Any  # qwen35.engine.LLMEngine (or anything with its interface)
    async_engine: AsyncEngine
    metrics: ServerMetrics
    config: ServerConfig
    _token_text: dict[int, tuple[str, list[int]]] = field(default_factory=dict)

    def check_model(self, model: str | None) -> str:
        names = {self.config.served_model_name, self.config.model_path}
        if model is not None and model not in names:
            raise APIError(
                f"The model `{model}` does not exist; this server serves "
                f"`{self.config.served_model_name}`",
                404,
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return self.config.served_model_name

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes for logprobs (`bytes:\\xe2` for partial characters)."""
        hit = self._token_text.get(token_id)
        if hit is None:
            tok = self.engine.tokenizer
            raw = tok.token_bytes(token_id) if hasattr(tok, "token_bytes") else None
            if raw is None:
                text = tok.decode([token_id])
                raw = text.encode()
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._token_text[token_id] = (text, list(raw))
        return hit


async def read_json(request: Request, model_cls: type[BaseModel], max_bytes: int) -> Any:
    """Parse and validate the body; any problem is a 400 (413 when too large) in OpenAI's shape."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        f"request body of {size}+ bytes exceeds the limit of {limit} bytes (--max-body-bytes)",
        413,
        code="request_too_large",
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "NamedToolChoice"}


def validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    err = errors[0]
    # pydantic's loc names each alternative of a union ('str', 'list[int]', ...): drop those
    loc = [
        str(x)
        for x in err.get("loc", ())
        if isinstance(x, int) or not (x in _TYPE_TAGS or "[" in x or "-" in x)
    ]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    msg = err.get("msg", "invalid value")
    if len({tuple(x.get("loc", ()))[:1] for x in errors}) == 1 and len(errors) > 1:
        kinds = sorted({x["type"] for x in errors})
        msg = f"{msg} (or one of the other accepted forms; {len(errors)} mismatches: {kinds})"
    return APIError(f"invalid value for {param or 'the body'}: {msg}", param=param)


async def add_to_engine(
    state: ServerState, requests: list[tuple[str, Any, Any]], prompt_param: str
) -> RequestStream:
    """Queue requests, turning the engine's refusals into OpenAI errors."""
    from qwen35.engine import llm_engine as engine_mod  # PromptTooLongError lives with the engine

    too_long = getattr(engine_mod, "PromptTooLongError", ())
    try:
        return await state.async_engine.add_requests(requests)
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.param) from None
    except too_long as e:  # type: ignore[misc]
        raise APIError(str(e), param=prompt_param, code="context_length_exceeded") from None
    except QueueFullError as e:
        raise APIError(str(e), 503, "server_error", code="queue_full") from None
    except EngineDeadError as e:
        raise APIError(str(e), 503, "server_error", code="engine_dead") from None
    except (Qwen35Error, ValueError) as e:
        raise APIError(str(e), param=prompt_param) from None


def raise_for_error(out: Any, request_id: str) -> None:
    """The engine failed this request (its other requests go on): a 500 without internals
    (the engine logged them with the request id)."""
    if getattr(out, "error", None):
        raise APIError(
            f"the server failed while generating this request ({request_id}); other requests "
            "are not affected: retry it, or report the id",
            500,
            "server_error",
            code="generation_failed",
        )


def safe_logprob(x: float) -> float:
    # JSON has no -inf; clients expect a very negative number for impossible tokens
    return x if math.isfinite(x) else -9999.0


def chat_logprobs(state: ServerState, entries: list[TokenLogprob], top_n: int) -> list[dict]:
    out = []
    for e in entries:
        text, raw = state.token_text(e.token_id)
        top = sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
        out.append(
            {
                "token": text,
                "logprob": safe_logprob(e.logprob),
                "bytes": raw,
                "top_logprobs": [
                    {
                        "token": state.token_text(t)[0],
                        "logprob": safe_logprob(lp),
                        "bytes": state.token_text(t)[1],
                    }
                    for t, lp in top
                ],
            }
        )
    return out


def completion_logprobs(
    state: ServerState, entries: list[TokenLogprob], top_n: int, offset: int
) -> dict[str, list]:
    """Legacy completions logprobs; `offset` is the text length before the first token."""
    res: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        text = state.token_text(e.token_id)[0]
        res["tokens"].append(text)
        res["token_logprobs"].append(safe_logprob(e.logprob))
        top = sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
        res["top_logprobs"].append(
            {state.token_text(t)[0]: safe_logprob(lp) for t, lp in top} if top_n else None
        )
        res["text_offset"].append(offset)
        offset += len(text)
    return res


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that always runs `on_close` (abort the requests if unfinished) when
    the client disconnects, the stream is cancelled or it ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self.headers["cache-control"] = "no-cache"
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


_EXHAUSTED = object()


async def _next(stream: RequestStream) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _EXHAUSTED


async def collect(request: Request, stream: RequestStream, poll_s: float) -> AsyncIterator[Any]:
    """Yield a stream's outputs; abort it if the (non-streaming) client disconnects meanwhile."""
    nxt: asyncio.Future | None = None
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while True:
            nxt = asyncio.ensure_future(_next(stream))
            while True:
                done, _ = await asyncio.wait(
                    {nxt}, timeout=max(0.0, checked + poll_s - loop.time())
                )
                if loop.time() - checked >= poll_s:  # on a clock, even while tokens flow
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                if done:
                    break
            out = nxt.result()
            if out is _EXHAUSTED:
                return
            yield out
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
        stream.abort()  # frees the engine's blocks and slot; a no-op once all finished
