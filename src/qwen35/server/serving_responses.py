"""POST /v1/responses: OpenAI's Responses API over the chat pipeline (as vLLM serves it).

The request's `instructions` and `input` (a string, or items: messages with input_text /
input_image / output_text parts, function_call and function_call_output items) become chat
messages; `tools` (flat function tools), `tool_choice`, `max_output_tokens`, `text.format`
(json_schema / json_object) and `reasoning.effort` ("none" / "minimal": thinking off) map onto
the chat request, which is rendered, constrained and sampled exactly as /v1/chat/completions
does. The reply comes back as output items: a `reasoning` item (the think block), a `message`
with one `output_text`, and a `function_call` per tool call; `status` "incomplete" with
`incomplete_details.reason` "max_output_tokens" when the length ran out. Streaming sends the
Responses events (response.created ... output_text.delta ... response.completed), each with its
`sequence_number`. With `store` (the default) a finished response is kept in memory with its
conversation (`--max-stored-responses`, least recently used dropped): `previous_response_id`
continues it, GET / DELETE /v1/responses/{id} read or drop it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from qwen35.request import SamplingParamsError
from qwen35.server.chat_output import ChoiceBuilder
from qwen35.server.protocol import APIError, ChatCompletionRequest, random_id
from qwen35.server.serving_chat import start_chat
from qwen35.server.serving_common import (
    JSONResponse,
    ServerState,
    SSEResponse,
    collect_text,
    raise_for_error,
    request_id_of,
    with_reasoning_tokens,
)

_PASSED = ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "stop", "ignore_eos", "min_tokens",
           "skip_special_tokens", "logit_bias", "user", "priority")  # fmt: skip


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True  # kept for previous_response_id and GET (--max-stored-responses)
    metadata: dict[str, Any] | None = None
    # the sampling fields the chat request has too (vLLM-style extras included)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    priority: int = 0


def _content(parts: Any, where: str) -> str | list[dict[str, Any]]:
    """A Responses message's content -> chat content (text parts, image_url parts)."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise APIError(f"{where}.content must be a string or a list of parts", param="input")
    out: list[dict[str, Any]] = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            out.append({"type": "text", "text": p["text"]})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            out.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            raise APIError(
                f"{where}.content[{j}]: unsupported part {kind!r} (input_text, output_text and "
                "input_image with an image_url are)",
                param="input",
            )
    return out


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    if any(p["type"] != "text" for p in content):
        raise APIError("a system / developer message can hold text only", param="input")
    return "".join(p["text"] for p in content)


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The input items -> chat messages (consecutive function calls: one assistant message
    with several tool calls; developer messages are system messages)."""
    msgs: list[dict[str, Any]] = []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, it in enumerate(items):
        where = f"input[{i}]"
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"{where}.role must be user, system, developer or assistant, "
                               f"got {role!r}", param="input")  # fmt: skip
            role = "system" if role == "developer" else role
            msgs.append({"role": role, "content": _content(it.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(it.get(k), str) for k in ("call_id", "name", "arguments")):
                raise APIError(f"{where}: a function_call needs call_id, name and arguments "
                               "(strings)", param="input")  # fmt: skip
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}  # fmt: skip
            last = msgs[-1] if msgs else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            if not isinstance(it.get("call_id"), str) or not isinstance(out, str):
                raise APIError(f"{where}: a function_call_output needs call_id and output "
                               "(strings)", param="input")  # fmt: skip
            msgs.append({"role": "tool", "tool_call_id": it["call_id"], "content": out})
        elif kind == "reasoning":
            continue  # earlier turns' thinking: the chat template drops it too
        else:
            raise APIError(f"{where}: unsupported item type {kind!r}", param="input")
    if not msgs:
        raise APIError("input must not be empty", param="input")
    return msgs


def to_chat_messages(
    req: ResponsesRequest, history: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The stored conversation before (previous_response_id) + the input, with `instructions`
    as the system message (merged with a leading system / developer message: Qwen's template
    takes one). The instructions of earlier responses are not carried over, as OpenAI does."""
    msgs = [dict(m) for m in history] + input_messages(req)
    if req.instructions:
        if msgs[0]["role"] == "system":
            msgs[0] = {"role": "system",
                       "content": req.instructions + "\n\n" + _text(msgs[0]["content"])}  # fmt: skip
        else:
            msgs.insert(0, {"role": "system", "content": req.instructions})
    return msgs


def to_chat_request(
    req: ResponsesRequest, history: list[dict[str, Any]] = ()
) -> ChatCompletionRequest:
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") != "function" or not isinstance(t.get("name"), str):
                raise APIError(f"tools[{i}]: only function tools (type function, name) are "
                               "supported", param="tools")  # fmt: skip
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
            tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError('tool_choice must be "none", "auto", "required" or {"type": '
                           '"function", "name": ...}', param="tool_choice")  # fmt: skip
        choice = {"type": "function", "function": {"name": choice["name"]}}
    body: dict[str, Any] = {
        "messages": to_chat_messages(req, history), "max_tokens": req.max_output_tokens,
        "tools": tools,
        "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls,
        **{k: getattr(req, k) for k in _PASSED},
    }  # fmt: skip
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}  # fmt: skip
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    effort = (req.reasoning or {}).get("effort")
    if effort is not None:
        body["chat_template_kwargs"] = {"enable_thinking": effort not in ("none", "minimal")}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValueError as e:
        raise APIError(f"invalid request: {e}") from None


class _Output:
    """The reply's output items, from ChoiceBuilder deltas (streaming) or its message."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def open(self, kind: str) -> dict[str, Any]:
        if kind == "reasoning":
            item = {"id": random_id("rs"), "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}  # fmt: skip
        else:
            item = {"id": random_id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}  # fmt: skip
        self.items.append(item)
        return item

    def call(self, c: dict[str, Any]) -> dict[str, Any]:
        item = {"id": random_id("fc"), "type": "function_call", "call_id": c["id"],
                "name": c["function"]["name"], "arguments": c["function"]["arguments"],
                "status": "completed"}  # fmt: skip
        self.items.append(item)
        return item


def _finish(items: list[dict[str, Any]], status: str) -> None:
    for it in items:
        if it["type"] != "function_call":
            it["status"] = status


def _response(rid, created, model, req, output, status, usage) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": created, "model": model,
        "status": status, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id, "reasoning": req.reasoning,
        "store": req.store,
        "temperature": req.temperature, "top_p": req.top_p,
        "text": req.text or {"format": {"type": "text"}},
        "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
        "truncation": "disabled", "usage": usage,
    }  # fmt: skip


def _usage(state: ServerState, u: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's Responses usage; reasoning_tokens: the think block's text re-tokenized."""
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    think = [it["content"][0]["text"] for it in items if it["type"] == "reasoning"]
    reasoning = with_reasoning_tokens(state, u, think)["completion_tokens_details"]
    reasoning = reasoning["reasoning_tokens"]
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": u["total_tokens"]}  # fmt: skip


async def create_response(state: ServerState, request: Request) -> Response:
    req: ResponsesRequest = await state.read_request(request, ResponsesRequest)
    model = state.check_model(req.model)
    history = _history(state, req.previous_response_id)
    chat = to_chat_request(req, history)
    try:
        params = chat.sampling_params(chat.max_tokens, None, state.default_sampling)
    except SamplingParamsError as e:
        param = "max_output_tokens" if e.param == "max_tokens" else e.param
        raise APIError(str(e), param=param) from None
    if params.n != 1:
        raise APIError("n is not a Responses API field", param="n")
    rid = random_id("resp")
    prompt, stream = await start_chat(state, chat, params, rid, "input", model)
    tracker = state.metrics.tracker()
    created = int(time.time())
    builder = ChoiceBuilder(prompt.thinking, prompt.tools)

    if req.stream:
        events = _events(state, req, rid, created, model, stream, tracker, builder, history)
        return SSEResponse(events, stream.abort, request_id_of(request))

    text, finish, _ = await collect_text(state, request, stream, rid, tracker)
    m = builder.message(text)
    output = _Output()
    if m.reasoning_content:
        output.open("reasoning")["content"][0]["text"] = m.reasoning_content
    if m.content:
        output.open("message")["content"] = [
            {"type": "output_text", "text": m.content, "annotations": [], "logprobs": []}
        ]
    for c in m.tool_calls:
        output.call(c.model_dump())
    status = "incomplete" if finish == "length" else "completed"
    _finish(output.items, status)
    usage = await state.offload(_usage, state, tracker.usage(), output.items)  # (tokenizes)
    body = _response(rid, created, model, req, output.items, status, usage)
    _keep(state, req, history, body)
    return JSONResponse(body)


async def _events(state, req, rid, created, model, stream, tracker, builder, history):
    """Responses streaming events (`event:` lines and JSON with `type` and `sequence_number`)."""
    seq = 0
    output = _Output()
    cur: dict[str, Any] | None = None  # the open reasoning / message item

    def ev(kind: str, **body) -> str:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **body}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def snapshot(status: str, usage=None) -> dict[str, Any]:
        return _response(rid, created, model, req, output.items, status, usage)

    def close() -> list[str]:
        nonlocal cur
        if cur is None:
            return []
        i, cur_item, cur = len(output.items) - 1, cur, None
        cur_item["status"] = "completed"
        if cur_item["type"] == "reasoning":
            text = cur_item["content"][0]["text"]
            return [ev("response.reasoning_text.done", item_id=cur_item["id"], output_index=i,
                       content_index=0, text=text),
                    ev("response.output_item.done", output_index=i, item=cur_item)]  # fmt: skip
        part = cur_item["content"][0]
        return [ev("response.output_text.done", item_id=cur_item["id"], output_index=i,
                   content_index=0, text=part["text"], logprobs=[]),
                ev("response.content_part.done", item_id=cur_item["id"], output_index=i,
                   content_index=0, part=part),
                ev("response.output_item.done", output_index=i, item=cur_item)]  # fmt: skip

    def emit(delta: dict[str, Any]) -> list[str]:
        nonlocal cur
        out: list[str] = []
        for kind, key in (("reasoning", "reasoning_content"), ("message", "content")):
            if not delta.get(key):
                continue
            if cur is None or cur["type"] != kind:
                out += close()
                cur = output.open(kind)
                i = len(output.items) - 1
                out.append(ev("response.output_item.added", output_index=i, item=dict(cur)))
                if kind == "message":
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    cur["content"] = [part]
                    out.append(ev("response.content_part.added", item_id=cur["id"],
                                  output_index=i, content_index=0, part=dict(part)))  # fmt: skip
            i = len(output.items) - 1
            cur["content"][0]["text"] += delta[key]
            name = "response.reasoning_text.delta" if kind == "reasoning" else (
                "response.output_text.delta")  # fmt: skip
            extra = {} if kind == "reasoning" else {"logprobs": []}
            out.append(ev(name, item_id=cur["id"], output_index=i, content_index=0,
                          delta=delta[key], **extra))  # fmt: skip
        for c in delta.get("tool_calls") or []:
            out += close()
            item = output.call(c)
            i = len(output.items) - 1
            out += [ev("response.output_item.added", output_index=i,
                       item={**item, "arguments": "", "status": "in_progress"}),
                    ev("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=i, delta=item["arguments"]),
                    ev("response.function_call_arguments.done", item_id=item["id"],
                       output_index=i, name=item["name"], arguments=item["arguments"]),
                    ev("response.output_item.done", output_index=i, item=item)]  # fmt: skip
        return out

    yield ev("response.created", response=snapshot("in_progress"))
    yield ev("response.in_progress", response=snapshot("in_progress"))
    finish = None
    async for out in stream:
        raise_for_error(out, rid)
        tracker.on_output(out)
        for o in out.outputs:
            for e in emit(builder.feed(o.text)):
                yield e
            finish = o.finish_reason or finish
    for e in emit(builder.finish()) + close():
        yield e
    tracker.done()
    status = "incomplete" if finish == "length" else "completed"
    _finish(output.items, status)
    kind = "response.incomplete" if status == "incomplete" else "response.completed"
    usage = await state.offload(_usage, state, tracker.usage(), output.items)
    body = snapshot(status, usage)
    _keep(state, req, history, body)
    yield ev(kind, response=body)


# ---- the in-memory store (previous_response_id, GET / DELETE /v1/responses/{id}) -----------------


def _history(state: ServerState, rid: str | None) -> list[dict[str, Any]]:
    if rid is None:
        return []
    kept = state.responses.get(rid)
    if kept is None:
        raise APIError(
            f"no stored response {rid[:80]!r}: responses are kept in memory, the last "
            f"{state.config.max_stored_responses} (--max-stored-responses), and lost on restart; "
            "send the whole conversation in input",
            404, "invalid_request_error", "previous_response_id", "response_not_found",
        )  # fmt: skip
    state.responses.move_to_end(rid)
    return kept[0]


def _keep(state: ServerState, req: ResponsesRequest, history: list, body: dict[str, Any]) -> None:
    """Store a finished response with its conversation (no instructions: they are per response)."""
    cap = state.config.max_stored_responses
    if not req.store or cap == 0:
        return
    reply: dict[str, Any] = {"role": "assistant", "content": None}
    text = "".join(p["text"] for it in body["output"] if it["type"] == "message"
                   for p in it["content"])  # fmt: skip
    calls = [{"id": it["call_id"], "type": "function",
              "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in body["output"] if it["type"] == "function_call"]  # fmt: skip
    reply["content"] = text or (None if calls else "")
    if calls:
        reply["tool_calls"] = calls
    state.responses[body["id"]] = ([*history, *input_messages(req), reply], body)
    while len(state.responses) > cap:
        state.responses.popitem(last=False)


def stored_response(state: ServerState, rid: str, delete: bool = False) -> dict[str, Any]:
    """GET /v1/responses/{id} (the body as returned) or DELETE it."""
    kept = state.responses.pop(rid, None) if delete else state.responses.get(rid)
    if kept is None:
        raise APIError(f"no stored response {rid[:80]!r}", 404, "invalid_request_error", None,
                       "response_not_found")  # fmt: skip
    if delete:
        return {"id": rid, "object": "response.deleted", "deleted": True}
    return kept[1]
