"""What the chat and completions handlers share: server config and state (with the worker pool
for heavy request work), engine-error mapping, logprob formatting, JSON and SSE framing, and
clean-up when a client goes away."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen35.errors import Qwen35Error, shown
from qwen35.request import SamplingParamsError, TokenLogprob
from qwen35.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    QueueTooSmallError,
    RequestStream,
)
from qwen35.server.body import parse_request, read_body
from qwen35.server.limits import RequestLimits, check_prompt_tokens
from qwen35.server.metrics import ServerMetrics
from qwen35.server.protocol import APIError, error_body

log = logging.getLogger("qwen35.server")

RETRY_AFTER = {"retry-after": "1"}  # seconds; sent with every 503
_ORIGIN = re.compile(r"https?://(\[[0-9a-fA-F:.]+\]|[^/\s:\[\]]+)(:[0-9]{1,5})?")


@dataclass
class ServerConfig:
    served_model_name: str
    model_path: str | None = None  # also accepted as `model` in requests
    # more names accepted as `model` (vLLM's --served-model-name A B ...: replies say the first)
    model_aliases: tuple[str, ...] = ()
    trust_request_chat_template: bool = False  # a request's own `chat_template` is rendered
    api_key: str | None = None
    max_queue: int | None = None  # sequences allowed to wait for a running slot (None: no cap)
    max_body_bytes: int = 16 * 1024 * 1024
    limits: RequestLimits = field(default_factory=RequestLimits)
    worker_threads: int = 4  # parse / render / tokenize off the event loop and the engine thread
    disconnect_poll_s: float = 0.5  # how often non-streaming handlers check for a gone client
    # /v1/responses kept in memory for previous_response_id and GET (least recently used
    # dropped past it; 0: none stored)
    max_stored_responses: int = 256
    # origins (scheme://host[:port], or "*") whose pages may call the API from a browser (CORS)
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_queue is not None and (
            not isinstance(self.max_queue, int) or self.max_queue < 1
        ):
            raise Qwen35Error(
                f"--max-queue must be an integer >= 1 (sequences that may wait), got "
                f"{self.max_queue!r}; leave it out for no limit"
            )
        if self.max_body_bytes < 1 or self.worker_threads < 1:
            raise Qwen35Error("max_body_bytes and worker_threads must be >= 1")
        if self.max_stored_responses < 0:
            raise Qwen35Error("--max-stored-responses must be >= 0")
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise Qwen35Error(
                    f"--allowed-origins: {origin!r} is not an origin; give scheme://host[:port] "
                    "as a browser sends it (e.g. http://localhost:3000, no path or trailing "
                    "slash), or * for any"
                )


@dataclass
class ServerState:
    engine: Any  # qwen35.engine.LLMEngine (or anything with its interface)
    async_engine: AsyncEngine
    metrics: ServerMetrics
    config: ServerConfig
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    _token_text: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    # serving_responses.py: response id -> (its conversation as chat messages, its body)
    responses: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    # LoRA adapters a request's `model` may name (serving_lora.py): name -> its directory
    loras: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        list_loras = getattr(self.engine, "list_loras", None)
        if list_loras is not None:
            self.loras = dict(list_loras())
        clash = next((n for n in self.model_names if n in self.loras), None)
        if clash is not None:
            raise Qwen35Error(
                f"a LoRA adapter is named like the served model ({clash!r}): rename one "
                "(--lora-modules NAME=PATH, --served-model-name)"
            )
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(
                self.config.worker_threads, thread_name_prefix="qwen35-worker"
            )

    @property
    def default_sampling(self) -> dict:
        """The engine's request defaults from generation_config.json ({} for none)."""
        return getattr(self.engine, "default_sampling", None) or {}

    @property
    def context_len(self) -> int | None:
        return getattr(self.engine, "max_model_len", None)

    @property
    def prompt_limit(self) -> int:
        limit = self.config.limits.max_prompt_tokens
        ctx = self.context_len
        if limit is None:
            return ctx if ctx is not None else 1 << 62
        return min(limit, ctx) if ctx is not None else limit

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the worker pool (CPU-heavy request work: parsing, rendering,
        tokenizing) so neither the event loop nor the engine thread waits for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    async def read_request(self, request: Request, model_cls: type) -> Any:
        raw = await read_body(request, self.config.max_body_bytes)
        limits = self.config.limits
        return await self.offload(
            parse_request, raw, model_cls, limits, self.prompt_limit, self.context_len
        )

    def encode(self, prompt: str | list[int], param: str, truncate: int | None = None) -> list[int]:
        """Token ids of a prompt (its last `truncate` ones: vLLM's truncate_prompt_tokens),
        within the prompt limit (runs on a worker thread)."""
        encode = getattr(self.engine, "encode_prompt", None)
        try:
            ids = encode(prompt) if encode is not None else _plain_encode(self.engine, prompt)
        except UnicodeError:
            raise APIError(f"{param} is not valid Unicode", param=param) from None
        except (Qwen35Error, ValueError) as e:
            raise APIError(str(e), param=param) from None
        if not ids:
            raise APIError(f"{param} must not be empty", param=param)
        if isinstance(truncate, int) and truncate >= 1:  # (else the sampling params refuse it)
            ids = ids[-truncate:]
        check_prompt_tokens(len(ids), self.prompt_limit, self.context_len, param)
        return ids

    @property
    def model_names(self) -> tuple[str, ...]:
        """The served model's names: --served-model-name's (first: the one replies carry)."""
        return (self.config.served_model_name, *self.config.model_aliases)

    def check_model(self, model: str | None) -> str:
        """The model a request names: the served model (by any of its names, or its path), or
        a LoRA adapter's name; anything else is a 404."""
        if model is not None and model in self.loras:
            return model
        names = {*self.model_names, self.config.model_path}
        if model is not None and model not in names:
            extra = f" and the LoRA adapters {', '.join(sorted(self.loras))}" if self.loras else ""
            raise APIError(
                f"The model `{shown(model, 100)}` does not exist; this server serves "
                f"`{self.config.served_model_name}`{extra}",
                404,
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return self.config.served_model_name

    def lora_of(self, model: str) -> str | None:
        """The LoRA adapter a checked model name runs with (None: the base model)."""
        return model if model in self.loras else None

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


async def add_to_engine(
    state: ServerState, requests: list[tuple[str, Any, Any]], prompt_param: str, model: str
) -> RequestStream:
    """Queue requests for `model` (check_model's answer: the base model or a LoRA adapter),
    turning the engine's refusals into OpenAI errors."""
    from qwen35.engine import llm_engine as engine_mod  # PromptTooLongError lives with the engine

    too_long = getattr(engine_mod, "PromptTooLongError", ())
    try:
        return await state.async_engine.add_requests(requests, state.lora_of(model))
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.param) from None
    except too_long as e:  # type: ignore[misc]
        raise APIError(str(e), param=prompt_param, code="context_length_exceeded") from None
    except QueueTooSmallError as e:
        raise APIError(str(e), param="n", code="request_too_large") from None
    except QueueFullError as e:
        raise APIError(
            str(e), 503, "server_error", code="queue_full", headers=RETRY_AFTER
        ) from None
    except EngineDeadError as e:
        raise engine_dead_error(e) from None
    except (Qwen35Error, ValueError) as e:
        raise APIError(str(e), param=prompt_param) from None


def engine_dead_error(e: EngineDeadError) -> APIError:
    return APIError(str(e), 503, "server_error", code="engine_dead", headers=RETRY_AFTER)


def _plain_encode(engine: Any, prompt: str | list[int]) -> list[int]:
    return engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse, but text UTF-8 cannot encode (a lone surrogate) is \\u-escaped
    instead of failing the response."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def internal_error_body(request_id: str | None) -> dict:
    rid = f" (request id {request_id})" if request_id else ""
    return error_body(
        f"internal server error{rid}; the details are in the server log",
        "server_error",
        code="internal_error",
    )


# errors whose message the engine wrote for the client (no internals): passed on as they are
CLIENT_FACING = ("StructuredOutputError: ", "NoTokenAllowedError: ")
# of those, the ones the request's own constraints caused (they contradict each other): a 400
CLIENT_CAUSED = ("NoTokenAllowedError: ",)


def raise_for_error(out: Any, request_id: str) -> None:
    """The engine failed this request (its other requests go on): a 500 without internals
    (the engine logged them with the request id), or with the cause where the engine wrote it
    for the client (a grammar that cannot continue with this model), or a 400 where the
    request's own constraints left no token to sample."""
    err = getattr(out, "error", None)
    if err:
        said = next((err[len(p) :] for p in CLIENT_FACING if err.startswith(p)), None)
        if err.startswith(CLIENT_CAUSED):
            raise APIError(f"{said} ({request_id})", 400, "invalid_request_error",
                           code="no_token_allowed")  # fmt: skip
        raise APIError(
            f"{said} ({request_id})" if said else
            f"the server failed while generating this request ({request_id}); other requests "
            "are not affected: retry it, or report the id",
            500,
            "server_error",
            code="generation_failed",
        )  # fmt: skip


def safe_logprob(x: float) -> float:
    # JSON has no -inf; clients expect a very negative number for impossible tokens
    return x if math.isfinite(x) else -9999.0


def _name(state: ServerState, token_id: int, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or vLLM's return_tokens_as_token_ids form
    "token_id:N" (for tokens whose text is not a whole character, or to skip re-tokenizing)."""
    return f"token_id:{token_id}" if as_ids else state.token_text(token_id)[0]


def chat_logprobs(
    state: ServerState, entries: list[TokenLogprob], top_n: int, as_ids: bool = False
) -> list[dict]:
    out = []
    for e in entries:
        raw = state.token_text(e.token_id)[1]
        top = sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
        out.append(
            {
                "token": _name(state, e.token_id, as_ids),
                "logprob": safe_logprob(e.logprob),
                "bytes": raw,
                "top_logprobs": [
                    {
                        "token": _name(state, t, as_ids),
                        "logprob": safe_logprob(lp),
                        "bytes": state.token_text(t)[1],
                    }
                    for t, lp in top
                ],
            }
        )
    return out


def completion_logprobs(
    state: ServerState,
    entries: list[TokenLogprob],
    top_n: int,
    offset: int,
    first: int | None = None,
    as_ids: bool = False,
) -> dict[str, list]:
    """Legacy completions logprobs; `offset` is the text length before the first token.
    first: echo's first prompt token, which has no logprob (nothing comes before it).
    as_ids: tokens named "token_id:N" (text offsets still count their text)."""
    res: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    rows = [(first, None)] if first is not None else []
    for tok, e in rows + [(e.token_id, e) for e in entries]:
        text = state.token_text(tok)[0]
        res["tokens"].append(_name(state, tok, as_ids))
        res["token_logprobs"].append(None if e is None else safe_logprob(e.logprob))
        top = [] if e is None else sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
        res["top_logprobs"].append(
            {_name(state, t, as_ids): safe_logprob(lp) for t, lp in top} if top else None
        )
        res["text_offset"].append(offset)
        offset += len(text)
    return res


def with_reasoning_tokens(state: ServerState, usage: dict[str, Any], reasoning: list[str]):
    """usage + OpenAI's completion_tokens_details.reasoning_tokens: the think blocks' text
    re-tokenized (run it on the worker pool)."""
    n = sum(len(state.engine.tokenizer.encode(t)) for t in reasoning if t)
    details = {"reasoning_tokens": min(n, usage["completion_tokens"])}
    return {**usage, "completion_tokens_details": details}


def prompt_logprobs_json(
    state: ServerState, entries: list[TokenLogprob | None] | None
) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a map token
    id -> {logprob, rank, decoded_token}: the prompt's own token first, then the top-n."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        top = sorted(e.top.items(), key=lambda kv: -kv[1])
        ranks = {t: r for r, (t, _) in enumerate(top, 1)}
        ranks[e.token_id] = e.rank if e.rank is not None else ranks.get(e.token_id)
        row = {}
        for t, lp in [(e.token_id, e.logprob), *top]:
            if str(t) not in row:
                row[str(t)] = {"logprob": safe_logprob(lp), "rank": ranks[t],
                               "decoded_token": state.token_text(t)[0]}  # fmt: skip
        out.append(row)
    return out


SSE_DONE = "data: [DONE]\n\n"


def sse(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it rather than cut the stream
        text = json.dumps(data)
    return f"data: {text}\n\n"


async def guarded_events(
    events: AsyncIterator[str],
    request_id: str | None,
    done: bool = True,
    error_event: Callable[[dict], str] = sse,
) -> AsyncIterator[str]:
    """An SSE body that always ends with `data: [DONE]` (unless `done` is False: Anthropic's
    streams end with their last event): an engine that died, an APIError or an internal error
    becomes an error event first (`error_event` of its OpenAI-shaped body; internal details go
    to the log only)."""
    try:
        async for item in events:
            yield item
    except EngineDeadError as e:
        yield error_event(error_body(str(e), "server_error", code="engine_dead"))
    except APIError as e:  # raised on purpose mid-stream (e.g. the engine failed this request)
        yield error_event(e.body())
    except Exception:
        log.exception("internal error in a stream (request id %s)", request_id)
        yield error_event(internal_error_body(request_id))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    if done:
        yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A streaming response that always ends with `data: [DONE]` (guarded_events) and always
    runs `on_close` (abort the requests if unfinished) when the client disconnects, the stream
    is cancelled or it ends."""

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], None],
        request_id: str | None = None,
        done: bool = True,
        error_event: Callable[[dict], str] = sse,
        media_type: str = "text/event-stream",  # (Ollama's streams: application/x-ndjson)
    ):
        super().__init__(guarded_events(content, request_id, done, error_event),
                         media_type=media_type)  # fmt: skip
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


async def collect_text(
    state: ServerState, request: Request, stream: RequestStream, rid: str, tracker: Any
) -> tuple[str, str | None, Any]:
    """A one-sequence request's whole output -> (text, finish_reason, stop_reason); the
    Responses and Messages endpoints' non-streaming replies."""
    text, finish, stop = "", None, None
    async with aclosing(collect(request, stream, state.config.disconnect_poll_s)) as outs:
        try:
            async for out in outs:
                raise_for_error(out, rid)
                tracker.on_output(out)
                for o in out.outputs:
                    text += o.text
                    finish = o.finish_reason or finish
                    stop = o.stop_reason if o.stop_reason is not None else stop
        except EngineDeadError as e:
            raise engine_dead_error(e) from None
    tracker.done()
    return text, finish, stop


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
