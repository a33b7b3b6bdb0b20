"""POST /v1/messages: Anthropic's Messages API over the chat pipeline (vLLM and llama.cpp's server
offer it too), so Anthropic clients (the `anthropic` SDK, tools that take an ANTHROPIC_BASE_URL) can
use a Qwen 3.5 server; POST /v1/messages/count_tokens counts a request's prompt tokens.

The request becomes a chat request, rendered, constrained and sampled exactly as
/v1/chat/completions does: `system` (a string or text blocks, joined by blank lines) is the system
message; user `text` / `image` blocks become text / image parts, `tool_result` blocks tool messages;
assistant `text`, `thinking` and `tool_use` blocks become its content, reasoning and tool calls;
`tools` (custom tools: name, description, input_schema) are function tools; `tool_choice` auto / any
/ tool / none is "auto" / "required" / a named tool / "none" (`disable_parallel_tool_use`: one
call); `thinking` {"type": "enabled"} / {"type": "disabled"} turns Qwen's thinking on / off (without
it, the model's default: on for 4B and larger; `budget_tokens` caps the think block: the chat's
thinking_token_budget; "adaptive" and "between_tools": the default). A final assistant message is a
prefill: the reply continues its text (chat's continue_final_message). `output_config.format` (a
JSON schema) constrains the text as the chat's `response_format` does; `stop_sequences`,
`temperature`, `top_p`, `top_k` and `max_tokens` (required, as Anthropic's API has it; more than the
context leaves after the prompt is cut to what it leaves: clients send 32,000 whatever the server)
are the chat fields. The reply's content is a `thinking` block (the think block, empty signature), a
`text` block and a `tool_use` block per call; `stop_reason` end_turn / max_tokens / stop_sequence /
tool_use; `usage.input_tokens` excludes the prompt tokens the prefix cache served
(`cache_read_input_tokens`), as Anthropic counts them. Streaming sends Anthropic's events
(message_start at once, `ping` while no token comes, content_block_start / delta / stop,
message_delta, message_stop; an `error` event if the request fails mid-stream). Errors come in
Anthropic's shape `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from qwen35.request import SamplingParamsError
from qwen35.server.chat_output import ChoiceBuilder
from qwen35.server.limits import check_request_size
from qwen35.server.protocol import APIError, ChatCompletionRequest, random_id
from qwen35.server.serving_chat import prepare_chat, start_chat
from qwen35.server.serving_common import (
    JSONResponse,
    ServerState,
    SSEResponse,
    collect_text,
    raise_for_error,
    request_id_of,
)

PING_S = 10.0  # a stream waiting this long for its first (or next) token sends a `ping`

# HTTP status -> Anthropic's error type
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error"}  # fmt: skip


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int
    messages: list[Any]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", ...}}
    metadata: dict[str, Any] | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = None  # (not needed to count)


def anthropic_error(e: APIError) -> JSONResponse:
    body = {"type": "error", "error": {"type": _ERROR_TYPES.get(e.status, "api_error"),
                                       "message": e.message}}  # fmt: skip
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def _error_event(body: dict[str, Any]) -> str:
    """An OpenAI-shaped error body (guarded_events') as Anthropic's `error` event."""
    err = body.get("error") or {}
    kind = "invalid_request_error" if err.get("type") == "invalid_request_error" else "api_error"
    data = {"type": "error", "error": {"type": kind, "message": err.get("message", "")}}
    return f"event: error\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- request -> chat request ------------------------------------------------------------------
def _text_of(blocks: Any, where: str, sep: str = "") -> str:
    """A string, or text blocks joined by `sep` (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(f"{where} must be a string or a list of text blocks", param=where)
    texts = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise APIError(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": "
                           "...}})", param=where)  # fmt: skip
        texts.append(b["text"])
    return sep.join(texts)


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64" and isinstance(src.get("data"), str):
        media = src.get("media_type") if isinstance(src.get("media_type"), str) else "image/png"
        url = f"data:{media};base64,{src['data']}"
    elif kind == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise APIError(f"{where}.source must be {{\"type\": \"base64\", \"media_type\", \"data\"}} "
                       "or {\"type\": \"url\", \"url\"}", param="messages")  # fmt: skip
    return {"type": "image_url", "image_url": {"url": url}}


def _result(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A tool_result's content: a string, or text and image blocks (a screenshot a tool took)."""
    if not isinstance(content, list) or not any(
        isinstance(b, dict) and b.get("type") == "image" for b in content
    ):
        return _text_of(content, where)
    parts = []
    for j, b in enumerate(content):
        if isinstance(b, dict) and b.get("type") == "image":
            parts.append(_image(b, f"{where}[{j}]"))
        else:
            parts.append({"type": "text", "text": _text_of([b], where)})
    return parts


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """A user message -> its tool results (tool messages) first, then one user message with the
    text and image parts (a turn that answers tools and adds words, as Anthropic clients send)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise APIError(f"{where}.content must be a string or a list of blocks", param="messages")
    tools, parts = [], []
    for j, b in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image(b, at))
        elif kind == "tool_result" and isinstance(b.get("tool_use_id"), str):
            tools.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                          "content": _result(b.get("content", ""), f"{at}.content")})  # fmt: skip
        else:
            raise APIError(f"{at}: unsupported block {kind!r} in a user message (text, image and "
                           "tool_result with a tool_use_id are)", param="messages")  # fmt: skip
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _assistant(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise APIError(f"{where}.content must be a string or a list of blocks", param="messages")
    text, thinking, calls = [], [], []
    for j, b in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            thinking.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue  # (opaque to this model)
        elif kind == "tool_use" and isinstance(b.get("name"), str):
            args = b.get("input", {})
            if not isinstance(args, dict):
                raise APIError(f"{at}.input must be an object", param="messages")
            calls.append({"id": b.get("id") or random_id("toolu"), "type": "function",
                          "function": {"name": b["name"], "arguments": args}})  # fmt: skip
        else:
            raise APIError(f"{at}: unsupported block {kind!r} in an assistant message (text, "
                           "thinking and tool_use with a name are)", param="messages")  # fmt: skip
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if thinking:
        msg["reasoning_content"] = "\n".join(thinking)
    if calls:
        msg["tool_calls"] = calls
    return msg


def to_chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if req.system is not None:
        system = _text_of(req.system, "system", sep="\n\n")
        if system:
            msgs.append({"role": "system", "content": system})
    if not req.messages:
        raise APIError("messages must not be empty", param="messages")
    for i, m in enumerate(req.messages):
        role = getattr(m, "role", None) if not isinstance(m, dict) else m.get("role")
        content = getattr(m, "content", None) if not isinstance(m, dict) else m.get("content")
        where = f"messages[{i}]"
        if role == "user":
            msgs += _user(content, where)
        elif role == "assistant":
            msgs.append(_assistant(content, where))
        else:
            raise APIError(f"{where}.role must be user or assistant, got {role!r} (the system "
                           "prompt goes in `system`)", param="messages")  # fmt: skip
    return msgs


def _tools(req: MessagesRequest) -> tuple[list[dict[str, Any]] | None, Any, bool]:
    """(chat tools, chat tool_choice, parallel_tool_calls)."""
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
                raise APIError(f"tools[{i}]: only custom tools (name, description, "
                               f"input_schema) are supported, got type {t.get('type')!r}",
                               param="tools")  # fmt: skip
            fn = {"name": t["name"]}
            if isinstance(t.get("description"), str):
                fn["description"] = t["description"]
            fn["parameters"] = t.get("input_schema") or {"type": "object", "properties": {}}
            tools.append({"type": "function", "function": fn})
    choice = req.tool_choice or {}
    kind = choice.get("type", "auto")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "auto":
        return tools, "auto" if tools else None, parallel
    if kind == "any":
        return tools, "required", parallel
    if kind == "none":
        return tools, "none", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return tools, {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError('tool_choice must be {"type": "auto" | "any" | "none"} or {"type": "tool", '
                   '"name": ...}', param="tool_choice")  # fmt: skip


def to_chat_request(state: ServerState, req: MessagesRequest) -> ChatCompletionRequest:
    tools, choice, parallel = _tools(req)
    msgs = to_chat_messages(req)
    body: dict[str, Any] = {
        "messages": msgs, "max_tokens": req.max_tokens, "tools": tools,
        "tool_choice": choice, "parallel_tool_calls": parallel, "stop": req.stop_sequences,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
    }  # fmt: skip
    thinking = (req.thinking or {}).get("type")
    if thinking in ("enabled", "disabled"):
        body["chat_template_kwargs"] = {"enable_thinking": thinking == "enabled"}
        budget = (req.thinking or {}).get("budget_tokens")
        if thinking == "enabled" and budget is not None:
            body["thinking_token_budget"] = budget
    elif thinking not in (None, "adaptive", "between_tools"):  # (those: the model's default)
        raise APIError('thinking.type must be "enabled", "disabled", "adaptive" or '
                       '"between_tools"', param="thinking")  # fmt: skip
    fmt = (req.output_config or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt.get("schema"), "strict": True}}  # fmt: skip
    elif fmt is not None:
        raise APIError('output_config.format must be {"type": "json_schema", "schema": {...}}',
                       param="output_config")  # fmt: skip
    if msgs[-1]["role"] == "assistant":  # a prefill: the reply continues it (Anthropic's rule)
        if msgs[-1].get("tool_calls"):
            raise APIError("the final assistant message (a prefill the reply continues) may hold "
                           "text and thinking only, not tool_use", param="messages")  # fmt: skip
        body["add_generation_prompt"], body["continue_final_message"] = False, True
    check_request_size(body, state.config.limits, state.prompt_limit, state.context_len)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValueError as e:
        raise APIError(f"invalid request: {e}") from None


# ---- reply ------------------------------------------------------------------------------------
def _stop_reason(finish: str | None, stop: Any, has_calls: bool) -> tuple[str, str | None]:
    if has_calls:
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def _usage(u: dict[str, Any]) -> dict[str, Any]:
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": u["prompt_tokens"] - cached, "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}  # fmt: skip


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"] or "{}")}  # fmt: skip


def _message(rid: str, model: str, content: list, stop: tuple, usage: dict) -> dict[str, Any]:
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
            "usage": usage}  # fmt: skip


async def create_message(state: ServerState, request: Request) -> Response:
    try:
        return await _create_message(state, request)
    except APIError as e:
        return anthropic_error(e)


async def _create_message(state: ServerState, request: Request) -> Response:
    req: MessagesRequest = await state.read_request(request, MessagesRequest)
    model = state.check_model(req.model)
    chat = to_chat_request(state, req)
    try:
        params = chat.sampling_params(chat.max_tokens, None, state.default_sampling)
    except SamplingParamsError as e:
        param = {"stop": "stop_sequences"}.get(e.param, e.param)
        raise APIError(str(e), param=param) from None
    rid = random_id("msg")
    prompt, stream = await start_chat(state, chat, params, rid, "messages", model,
                                      fit_max_tokens=True)  # fmt: skip
    tracker = state.metrics.tracker()
    builder = ChoiceBuilder(prompt.thinking, prompt.tools)
    if req.stream:
        events = _events(rid, model, stream, tracker, builder, prompt.num_tokens or 0)
        return SSEResponse(events, stream.abort, request_id_of(request), done=False,
                           error_event=_error_event)  # fmt: skip

    text, finish, stop = await collect_text(state, request, stream, rid, tracker)
    m = builder.message(text)
    content: list[dict[str, Any]] = []
    if m.reasoning_content:
        content.append({"type": "thinking", "thinking": m.reasoning_content, "signature": ""})
    if m.content:
        content.append({"type": "text", "text": m.content})
    content += [_tool_use(c.model_dump()) for c in m.tool_calls]
    reason = _stop_reason(finish, stop, bool(m.tool_calls))
    return JSONResponse(_message(rid, model, content, reason, _usage(tracker.usage())))


async def _events(rid, model, stream, tracker, builder, prompt_tokens: int):
    """Anthropic's streaming events (`event:` lines, JSON with `type`): message_start at once
    (usage: the prompt's tokens; message_delta's usage splits off the cached ones), a `ping`
    every PING_S while no token comes (a long prompt's prefill on a CPU), the blocks, the end."""
    index = -1  # the open content block's index
    kind: str | None = None  # its type: "thinking" / "text" (tool_use blocks open and close)
    has_calls = False

    def ev(name: str, **body) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **body}, ensure_ascii=False)}\n\n"

    def close() -> list[str]:
        nonlocal kind
        if kind is None:
            return []
        out = []
        if kind == "thinking":  # (no signature: Qwen's thinking is plain text)
            out.append(ev("content_block_delta", index=index,
                          delta={"type": "signature_delta", "signature": ""}))  # fmt: skip
        kind = None
        return out + [ev("content_block_stop", index=index)]

    def emit(delta: dict[str, Any]) -> list[str]:
        nonlocal index, kind, has_calls
        out: list[str] = []
        for block, key, field in (("thinking", "reasoning_content", "thinking"),
                                  ("text", "content", "text")):  # fmt: skip
            if not delta.get(key):
                continue
            if kind != block:
                out += close()
                index, kind = index + 1, block
                start = {"type": "thinking", "thinking": "", "signature": ""} if block == (
                    "thinking") else {"type": "text", "text": ""}  # fmt: skip
                out.append(ev("content_block_start", index=index, content_block=start))
            out.append(ev("content_block_delta", index=index,
                          delta={"type": f"{field}_delta", field: delta[key]}))  # fmt: skip
        for c in delta.get("tool_calls") or []:
            out += close()
            index, has_calls = index + 1, True
            use = _tool_use(c)
            out += [ev("content_block_start", index=index, content_block={**use, "input": {}}),
                    ev("content_block_delta", index=index, delta={
                        "type": "input_json_delta", "partial_json": json.dumps(use["input"])}),
                    ev("content_block_stop", index=index)]  # fmt: skip
        return out

    usage = {"input_tokens": prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}  # fmt: skip
    yield ev("message_start", message=_message(rid, model, [], (None, None), usage))
    finish, stop = None, None
    while True:
        try:  # (cancelling the wait drops nothing: RequestStream's queue keeps its items)
            out = await asyncio.wait_for(anext(stream), PING_S)
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
            yield ev("ping")
            continue
        except StopAsyncIteration:
            break
        raise_for_error(out, rid)
        tracker.on_output(out)
        for o in out.outputs:
            for e in emit(builder.feed(o.text)):
                yield e
            finish = o.finish_reason or finish
            stop = o.stop_reason if o.stop_reason is not None else stop
    for e in emit(builder.finish()) + close():
        yield e
    tracker.done()
    reason = _stop_reason(finish, stop, has_calls)
    yield ev("message_delta", delta={"stop_reason": reason[0], "stop_sequence": reason[1]},
             usage=_usage(tracker.usage()))  # fmt: skip
    yield ev("message_stop")


async def count_tokens(state: ServerState, request: Request) -> Response:
    """POST /v1/messages/count_tokens: {"input_tokens": N} of the rendered prompt."""
    try:
        req: CountTokensRequest = await state.read_request(request, CountTokensRequest)
        state.check_model(req.model)
        chat = to_chat_request(state, req)

        def count() -> int:  # (images: the tokens each placeholder expands to, as the engine's
            # add_request has them; processed ones pass)
            _, ids = prepare_chat(state, chat, run=False)
            if isinstance(ids, dict):
                mm = state.engine.mm_processor
                ids = mm.process(ids["prompt_token_ids"], ids["multi_modal_data"]).token_ids
            return len(ids)

        return JSONResponse({"input_tokens": await state.offload(count)})
    except APIError as e:
        return anthropic_error(e)
