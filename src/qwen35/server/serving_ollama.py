"""Ollama's API over the chat pipeline, so that Ollama's clients (the `ollama` Python and
JavaScript libraries, apps set to an Ollama server's address) can use a qwen35 server: POST
/api/chat and /api/generate, GET /api/tags, /api/ps and /api/version, POST /api/show.

A request becomes a chat request, rendered, constrained and sampled as /v1/chat/completions
does: `messages` (role system / user / assistant / tool; `images`, base64, become image parts;
an assistant's `thinking` and `tool_calls` its reasoning and calls), or /api/generate's `system`
and `prompt` (and `images`) as a system and a user message; `tools` are OpenAI's function tools;
`format` "json" or a JSON schema constrains the reply as `response_format` does; `think`
true / false turns Qwen's thinking on / off (levels "low" / "medium" / "high": on; unset: the
model's default); `options` temperature, top_p, top_k, min_p, repeat_penalty (repetition
penalty), presence / frequency_penalty, seed, stop and num_predict (max tokens, cut to what the
context leaves after the prompt; -1 / -2: up to the context) are the chat fields, the others (num_ctx, num_thread, mirostat, ...) belong to
Ollama's runtime and are ignored, as `keep_alive` is. The reply's message holds the think block
in `thinking`, the text in `content` and the calls in `tool_calls` (arguments as objects, as
Ollama sends them); the last object has done true, done_reason stop / length, token counts
(prompt_eval_count, eval_count) and durations in nanoseconds (load_duration 0: the model is
always loaded). Streams, Ollama's default (`stream` false: one object), are newline-delimited
JSON, an `{"error": ...}` line if the request fails mid-stream. /api/generate with an empty
prompt, or /api/chat with no messages, loads the model (done_reason "load", "unload" with
keep_alive 0; it stays loaded), as Ollama answers them; `raw`, `suffix`, `template`
and `context` (Ollama's own template and token context) are refused with what to use instead.
The model is named by any served name (`name:latest` for a served `name` too). Errors are
`{"error": message}` with the HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

import qwen35
from qwen35.model_source import is_gguf_file
from qwen35.request import SamplingParamsError
from qwen35.server.chat_output import ChoiceBuilder
from qwen35.server.limits import check_request_size
from qwen35.server.protocol import APIError, ChatCompletionRequest, random_id
from qwen35.server.serving_chat import start_chat
from qwen35.server.serving_common import (
    JSONResponse,
    ServerState,
    SSEResponse,
    collect_text,
    raise_for_error,
    request_id_of,
)

# Ollama's option names -> the chat request's fields
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop",
            "num_predict": "max_tokens"}  # fmt: skip
_IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                (b"BM", "image/bmp"))  # fmt: skip


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    format: Any = None
    options: dict[str, Any] | None = None
    stream: bool = True  # (Ollama's default)
    think: bool | str | None = None
    keep_alive: Any = None


class OllamaChatRequest(_Base):
    messages: list[Any] | None = None
    tools: list[Any] | None = None


class OllamaGenerateRequest(_Base):
    prompt: str | None = None
    system: str | None = None
    images: list[Any] | None = None
    raw: bool | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[Any] | None = None


def ollama_error(e: APIError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- request --------------------------------------------------------------------------------
def _image(data: Any, where: str) -> dict[str, Any]:
    """A base64 image (Ollama's `images` items) as a chat image part, its type from its bytes."""
    if not isinstance(data, str):
        raise APIError(f"{where} must be a base64 string", param="images")
    try:
        head = base64.b64decode(data[:32] + "=" * (-len(data[:32]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(f"{where} is not base64 image data", param="images") from None
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    media = "image/webp" if webp else next(
        (m for magic, m in _IMAGE_TYPES if head.startswith(magic)), "image/png")  # fmt: skip
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def _content(text: Any, images: Any, where: str) -> Any:
    if text is not None and not isinstance(text, str):
        raise APIError(f"{where}.content must be a string", param="messages")
    if images is None or images == []:
        return text or ""
    if not isinstance(images, list):
        raise APIError(f"{where}.images must be a list of base64 images", param="images")
    parts = [_image(d, f"{where}.images[{j}]") for j, d in enumerate(images)]
    return parts + ([{"type": "text", "text": text}] if text else [])


def _calls(calls: Any, where: str) -> list[dict[str, Any]]:
    out = []
    for j, c in enumerate(calls if isinstance(calls, list) else [None]):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"{where}.tool_calls[{j}] must be {{\"function\": {{\"name\", "
                           "\"arguments\"}}}", param="messages")  # fmt: skip
        args = fn.get("arguments", {})
        if isinstance(args, str):  # (some clients send OpenAI's JSON text)
            try:
                args = json.loads(args or "{}")
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise APIError(f"{where}.tool_calls[{j}].function.arguments must be an object",
                           param="messages")  # fmt: skip
        out.append({"id": random_id("call"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})  # fmt: skip
    return out


def to_chat_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(f"{where}.role must be system, user, assistant or tool",
                           param="messages")  # fmt: skip
        msg: dict[str, Any] = {"role": role,
                               "content": _content(m.get("content"), m.get("images"), where)}
        if role == "assistant":
            if isinstance(m.get("thinking"), str) and m["thinking"]:
                msg["reasoning_content"] = m["thinking"]
            if m.get("tool_calls"):
                msg["tool_calls"] = _calls(m["tool_calls"], where)
        out.append(msg)
    return out


def _fields(state: ServerState, req: _Base) -> dict[str, Any]:
    """The chat request's fields from `options`, `format` and `think`."""
    opts = req.options or {}
    if not isinstance(opts, dict):
        raise APIError("options must be an object", param="options")
    body: dict[str, Any] = {_OPTIONS[k]: v for k, v in opts.items() if k in _OPTIONS}
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] < 0:
        body["max_tokens"] = None  # (-1: until it stops, -2: fill the context)
    fmt = req.format
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt, "strict": True}}  # fmt: skip
    elif fmt not in (None, ""):
        raise APIError('format must be "json" or a JSON schema object', param="format")
    think = req.think
    if think is not None:
        if think not in (True, False, "low", "medium", "high"):
            raise APIError('think must be true, false, "low", "medium" or "high"', param="think")
        body["chat_template_kwargs"] = {"enable_thinking": think is not False}
    return body


def _chat_request(state: ServerState, body: dict[str, Any]) -> ChatCompletionRequest:
    check_request_size(body, state.config.limits, state.prompt_limit, state.context_len)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValueError as e:
        raise APIError(f"invalid request: {e}") from None


def _loading(req: _Base) -> str:
    """What Ollama answers a request with nothing to generate: "load", or "unload" for
    keep_alive 0 (here the model stays loaded either way: the server holds one)."""
    return "unload" if req.keep_alive in (0, "0", "0s", "0m") else "load"


def _model(state: ServerState, name: str | None) -> str:
    if not name:
        raise APIError("model is required", param="model")
    names = {*state.model_names, *state.loras}
    if name not in names and name.endswith(":latest") and name[: -len(":latest")] in names:
        name = name[: -len(":latest")]
    try:
        return state.check_model(name)
    except APIError as e:
        raise APIError(f"model '{name}' not found ({e.message})", 404) from None


# ---- reply ----------------------------------------------------------------------------------
def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in calls:
        fn = c["function"]
        args = fn.get("arguments") or "{}"
        out.append({"function": {"name": fn["name"],
                                 "arguments": json.loads(args) if isinstance(args, str) else args}})
    return out


def _stats(tracker, reason: str | None) -> dict[str, Any]:
    """done_reason, token counts and durations (ns) of a finished request."""
    u = tracker.usage()
    end = time.perf_counter()
    first = end if tracker.first is None else tracker.first
    ns = 1_000_000_000
    return {"done": True, "done_reason": "length" if reason == "length" else "stop",
            "total_duration": int((end - tracker.start) * ns), "load_duration": 0,
            "prompt_eval_count": u["prompt_tokens"],
            "prompt_eval_duration": int((first - tracker.start) * ns),
            "eval_count": u["completion_tokens"], "eval_duration": int((end - first) * ns)}


def _ndjson(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _error_line(body: dict) -> str:
    return _ndjson({"error": body["error"]["message"]})


async def _run(state: ServerState, request: Request, model: str, body: dict, generate: bool):
    """Queue the chat and answer in Ollama's shape: /api/chat's `message` or /api/generate's
    `response` / `thinking`, streamed (newline-delimited JSON) or whole."""
    stream_reply = body.pop("stream")
    chat = _chat_request(state, body)
    try:
        params = chat.sampling_params(chat.max_tokens, None, state.default_sampling)
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.param) from None
    rid = random_id("ollama")
    prompt, stream = await start_chat(state, chat, params, rid, "messages", model,
                                      fit_max_tokens=True)  # (num_predict: a cap, as Ollama's)
    tracker = state.metrics.tracker()
    builder = ChoiceBuilder(prompt.thinking, prompt.tools)

    def shaped(delta: dict[str, Any]) -> dict[str, Any]:
        if generate:
            out = {"response": delta.get("content", "")}
            if delta.get("reasoning_content"):
                out["thinking"] = delta["reasoning_content"]
            return out
        msg: dict[str, Any] = {"role": "assistant", "content": delta.get("content", "")}
        if delta.get("reasoning_content"):
            msg["thinking"] = delta["reasoning_content"]
        if delta.get("tool_calls"):
            msg["tool_calls"] = _ollama_calls(delta["tool_calls"])
        return {"message": msg}

    async def events():
        reason = None
        async for out in stream:
            raise_for_error(out, rid)
            tracker.on_output(out)
            for o in out.outputs:
                reason = o.finish_reason or reason
                delta = builder.feed(o.text)
                if delta:
                    yield _ndjson({"model": model, "created_at": _now(), **shaped(delta),
                                   "done": False})  # fmt: skip
        last = builder.finish()
        tracker.done()
        yield _ndjson({"model": model, "created_at": _now(), **shaped(last),
                       **_stats(tracker, reason)})  # fmt: skip

    if stream_reply:
        return SSEResponse(events(), stream.abort, request_id_of(request), done=False,
                           error_event=_error_line, media_type="application/x-ndjson")  # fmt: skip
    text, reason, _ = await collect_text(state, request, stream, rid, tracker)
    m = builder.message(text)
    delta = {"content": m.content or "", "reasoning_content": m.reasoning_content,
             "tool_calls": [c.model_dump() for c in m.tool_calls]}  # fmt: skip
    return JSONResponse({"model": model, "created_at": _now(), **shaped(delta),
                         **_stats(tracker, reason)})  # fmt: skip


async def chat(state: ServerState, request: Request) -> Response:
    """POST /api/chat."""
    try:
        req: OllamaChatRequest = await state.read_request(request, OllamaChatRequest)
        model = _model(state, req.model)
        if req.messages == []:  # Ollama's "load" (keep_alive 0: "unload"): the model stays loaded
            return JSONResponse({"model": model, "created_at": _now(),
                                 "message": {"role": "assistant", "content": ""}, "done": True,
                                 "done_reason": _loading(req)})  # fmt: skip
        tools = req.tools or None
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise APIError("tools must be a list of function tools", param="tools")
        body = {"messages": to_chat_messages(req.messages), "tools": tools,
                "stream": req.stream, **_fields(state, req)}  # fmt: skip
        return await _run(state, request, model, body, generate=False)
    except APIError as e:
        return ollama_error(e)


async def generate(state: ServerState, request: Request) -> Response:
    """POST /api/generate."""
    try:
        req: OllamaGenerateRequest = await state.read_request(request, OllamaGenerateRequest)
        model = _model(state, req.model)
        for field, what in (("raw", "the prompt as it is: POST /v1/completions"),
                            ("suffix", "fill-in-the-middle: not offered"),
                            ("template", "a chat template: --chat-template"),
                            ("context", "an earlier reply's tokens: send the conversation to "
                                        "/api/chat")):  # fmt: skip
            if getattr(req, field):
                raise APIError(f"{field} is not supported here ({what})", param=field)
        if not req.prompt and not req.images:  # Ollama's "load the model": it is loaded
            return JSONResponse({"model": model, "created_at": _now(), "response": "",
                                 "done": True, "done_reason": _loading(req)})  # fmt: skip
        msgs = [{"role": "system", "content": req.system}] if req.system else []
        msgs.append({"role": "user", "content": req.prompt or "", "images": req.images})
        body = {"messages": to_chat_messages(msgs), "stream": req.stream, **_fields(state, req)}
        return await _run(state, request, model, body, generate=True)
    except APIError as e:
        return ollama_error(e)


# ---- models ---------------------------------------------------------------------------------
def _details(state: ServerState) -> dict[str, Any]:
    engine = state.engine
    cfg = getattr(engine, "config", None)
    moe = bool(getattr(cfg, "is_moe", False))
    path = str(state.config.model_path or "")
    load = getattr(getattr(engine, "engine_config", None), "load", None)
    level = getattr(load, "quantization", None)  # int8 / int4 / fp8 / bf16 (storage), else the
    if level is None:  # weights' own dtype, as Ollama names them (BF16, F32, F16)
        params = getattr(getattr(engine, "model", None), "parameters", None)
        dtype = str(next(params()).dtype) if params is not None else ""
        level = {"torch.bfloat16": "bf16", "torch.float32": "f32", "torch.float16": "f16"}.get(
            dtype, "")  # fmt: skip
    return {"parent_model": "", "format": "gguf" if is_gguf_file(path) else "safetensors",
            "family": "qwen35moe" if moe else "qwen35",
            "families": ["qwen35moe" if moe else "qwen35"],
            "parameter_size": _size(state), "quantization_level": str(level).upper()}  # fmt: skip


def _params(state: ServerState) -> int:
    """The checkpoint's parameter count (the config's: packed int4 tensors hold two a byte)."""
    cfg = getattr(state.engine, "config", None)
    if cfg is None or not hasattr(cfg, "hidden_size"):
        return 0
    from qwen35.plan.params import param_counts

    return param_counts(cfg).total


def _size(state: ServerState) -> str:
    n = _params(state)
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _weight_bytes(state: ServerState) -> int:
    model = getattr(state.engine, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _entries(state: ServerState, running: bool) -> list[dict[str, Any]]:
    details, size, now = _details(state), _weight_bytes(state), _now()
    out = []
    for name in state.model_names:
        digest = hashlib.sha256(f"{name}\n{state.config.model_path}".encode()).hexdigest()
        e = {"name": name, "model": name, "modified_at": now, "size": size, "digest": digest,
             "details": details}
        if running:
            gpu = str(getattr(state.engine, "device", "cpu")).startswith("cuda")
            e.update(expires_at="2999-12-31T23:59:59Z", size_vram=size if gpu else 0,
                     context_length=state.context_len)  # fmt: skip
            e.pop("modified_at")
        out.append(e)
    return out


async def tags(state: ServerState, request: Request) -> Response:
    """GET /api/tags: the served model's names."""
    return JSONResponse({"models": _entries(state, running=False)})


async def ps(state: ServerState, request: Request) -> Response:
    """GET /api/ps: the same, as loaded models (always: the server holds its one model)."""
    return JSONResponse({"models": _entries(state, running=True)})


async def version(state: ServerState, request: Request) -> Response:
    return JSONResponse({"version": qwen35.__version__})


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # (older clients' field)


async def show(state: ServerState, request: Request) -> Response:
    """POST /api/show: the model's details and capabilities."""
    try:
        req: OllamaShowRequest = await state.read_request(request, OllamaShowRequest)
        _model(state, req.model or req.name)
        details = _details(state)
        caps = ["completion", "tools", "thinking"]
        if getattr(state.engine, "has_vision", False):
            caps.append("vision")
        arch = details["family"]
        info = {"general.architecture": arch, "general.parameter_count": _params(state),
                f"{arch}.context_length": state.context_len}  # fmt: skip
        return JSONResponse({"modelfile": "", "parameters": "", "template": "",
                             "details": details, "model_info": info, "capabilities": caps,
                             "modified_at": _now()})  # fmt: skip
    except APIError as e:
        return ollama_error(e)
