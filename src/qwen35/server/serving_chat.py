"""POST /v1/chat/completions: render the chat template, generate, and split the reply into
reasoning (`<think>`), content and tool calls (`<tool_call>`) with ChatOutputParser.

`tool_choice`: "none" renders no tools and parses no tool calls; "auto" and "required" render
all tools; a named choice renders only that tool. "required" and a named choice also constrain
decoding to Qwen 3.5's tool-call format (server/structured.py), as do `response_format` and
vLLM's `structured_outputs` / `guided_*` to their constraint.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from qwen35.chat_format import (
    ChatFormatError,
    ChatTemplate,
    cache_points,
    check_text_only,
    prompt_thinking_enabled,
)
from qwen35.multimodal.chat import extract_media
from qwen35.multimodal.sizing import MediaError
from qwen35.request import SamplingParamsError
from qwen35.server.async_engine import EngineDeadError
from qwen35.server.chat_output import ChoiceBuilder
from qwen35.server.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Usage,
    random_id,
)
from qwen35.server.serving_common import (
    JSONResponse,
    ServerState,
    SSEResponse,
    add_to_engine,
    chat_logprobs,
    collect,
    engine_dead_error,
    prompt_logprobs_json,
    raise_for_error,
    request_id_of,
    sse,
    with_reasoning_tokens,
)
from qwen35.server.structured import precompile, request_constraint


@dataclass
class ChatPrompt:
    text: str
    thinking: bool  # the prompt leaves the model inside an open <think> block
    tools: list[dict[str, Any]] | None  # the tools rendered (and parsed for)
    media: dict[str, list] | None = None  # image / video sources in prompt order
    num_tokens: int | None = None  # its token ids (start_chat; None with images: the engine
    # expands each placeholder to the image's tokens)
    # the texts later requests share with it (ChatTemplate.shared_prefixes), and their lengths
    # in tokens (prepare_chat: SamplingParams.cache_points)
    shared: list[str] | None = None
    cache_points: tuple[int, ...] = ()


def request_template(engine: Any, req: ChatCompletionRequest, trusted: bool) -> Any:
    """The template a request renders with: the engine's, or its own `chat_template` (vLLM's
    field) where the server trusts request templates (--trust-request-chat-template: jinja runs
    sandboxed, but a template can still loop for long); else that field is a 400, never
    silently ignored."""
    if req.chat_template is None:
        return engine.chat_template
    if not trusted:
        raise APIError("this server does not render a request's own chat_template: start it "
                       "with --trust-request-chat-template (as vLLM), or give the template at "
                       "start-up with --chat-template", param="chat_template")  # fmt: skip
    try:
        return ChatTemplate.from_source(req.chat_template, engine.chat_template.special_tokens)
    except ChatFormatError as e:
        raise APIError(str(e), param="chat_template") from None


def build_chat_prompt(engine: Any, req: ChatCompletionRequest, trusted: bool = False,
                      shared: bool = False) -> ChatPrompt:  # fmt: skip
    """The prompt text for a chat request; bad messages / tools / kwargs are 400s. trusted:
    the server renders a request's own chat_template (request_template). shared: also the
    texts later requests share with it (ChatPrompt.shared), for a prompt the engine runs."""
    template = request_template(engine, req, trusted)
    # exclude_unset keeps what the client sent (explicit nulls too), in its order, for tojson
    tools = (
        [{"type": "function", **t.model_dump(exclude_unset=True)} for t in req.tools]
        if req.tools
        else None
    )
    choice = req.tool_choice
    if choice == "none":
        tools = None
    elif choice is not None and not isinstance(choice, str):
        name = choice.function.get("name")
        named = [t for t in tools or [] if t["function"]["name"] == name]
        if not named:
            raise APIError(
                f"tool_choice names {name!r}, which is not in tools", param="tool_choice"
            )
        tools = named
    elif choice == "required" and not tools:
        raise APIError('tool_choice "required" needs a non-empty tools list', param="tool_choice")
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is None and req.reasoning_effort is not None:
        thinking = req.reasoning_effort not in ("none", "minimal")
    if thinking is not None and not isinstance(thinking, bool):
        raise APIError(
            f"chat_template_kwargs.enable_thinking must be true or false, got {thinking!r}",
            param="chat_template_kwargs.enable_thinking",
        )
    for reserved in ("messages", "tools", "add_generation_prompt", "continue_final_message"):
        kwargs.pop(reserved, None)
    if req.documents is not None:  # (a template that reads `documents`; Qwen's does not)
        kwargs["documents"] = req.documents
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(
            "continue_final_message and add_generation_prompt cannot both be true: set "
            '"add_generation_prompt": false to continue the final message',
            param="continue_final_message",
        )
    messages = [m.model_dump(exclude_unset=True) for m in req.messages]
    if not getattr(engine, "has_vision", False):
        try:  # names the first image / video part (messages[i].content[j])
            check_text_only(messages)
        except ChatFormatError as e:
            raise APIError(f"invalid messages: {e}", param=e.param) from None
    try:
        messages, media = extract_media(messages)
    except MediaError as e:
        raise APIError(f"invalid messages: {e}", param="messages") from None
    if media and not getattr(engine, "has_vision", False):
        raise APIError(
            "this server's model has no vision encoder loaded: image and video parts are not "
            "accepted",
            param="messages",
        )
    try:
        text = template.render(
            messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
            enable_thinking=thinking, continue_final_message=req.continue_final_message, **kwargs,
        )  # fmt: skip
    except (ChatFormatError, TypeError, ValueError) as e:
        param = getattr(e, "param", None) or "messages"
        raise APIError(
            f"invalid messages: {e}", param=param, code=getattr(e, "code", None)
        ) from None
    except RecursionError:  # e.g. tool-call `arguments` (a JSON string) nested 100k deep
        raise APIError(
            "invalid messages: a value nests too deeply to render",
            param="messages",
            code="nested_too_deeply",
        ) from None
    prefixes = None  # (text prompts only: prepare_chat)
    if shared and not media and req.add_generation_prompt and not req.continue_final_message:
        prefixes = template.shared_prefixes(messages, tools, enable_thinking=thinking, **kwargs)
    return ChatPrompt(text, prompt_thinking_enabled(text), tools, media or None, shared=prefixes)


def load_server_media(engine: Any, media: dict[str, list], kwargs: dict | None = None
                      ) -> dict[str, list]:  # fmt: skip
    """Decode data: URLs, fetch allowed http(s) URLs (never server files) and preprocess (on
    the worker thread, not the event loop or the engine thread); bad media is a 400. kwargs:
    vLLM's mm_processor_kwargs (min_pixels / max_pixels of images)."""
    proc = engine.mm_processor
    opts = replace(proc.media, allow_local_files=False)
    if kwargs:
        unknown = sorted(set(kwargs) - {"min_pixels", "max_pixels"})
        if unknown:
            raise APIError(f"mm_processor_kwargs: {', '.join(map(str, unknown))} not supported "
                           "(min_pixels, max_pixels are)", param="mm_processor_kwargs")  # fmt: skip
        try:
            proc = proc.with_image_pixels(kwargs.get("min_pixels"), kwargs.get("max_pixels"))
        except MediaError as e:
            raise APIError(str(e), param="mm_processor_kwargs") from None
    try:
        return proc.preprocess(media, opts)
    except MediaError as e:
        raise APIError(f"invalid messages: {e}", param="messages") from None


def prepare_chat(state: ServerState, req: ChatCompletionRequest, run: bool = True
                 ) -> tuple[ChatPrompt, Any]:  # fmt: skip
    """Render and tokenize, and decode + preprocess images (on a worker thread: all cost time
    linear in the body). -> the prompt, and what goes to the engine (token ids, or with media
    {"prompt_token_ids", "multi_modal_data"}). run: the engine runs it (its cache points are
    found; not for counting tokens)."""
    prompt = build_chat_prompt(state.engine, req, state.config.trust_request_chat_template,
                               shared=run)  # fmt: skip
    ids = state.encode(prompt.text, "messages", req.truncate_prompt_tokens)
    if not prompt.media:
        encode = getattr(state.engine, "encode_prompt", None)
        if prompt.shared and encode is not None:
            prompt.cache_points = cache_points(encode, prompt.shared, ids, prompt.text)
        return prompt, ids
    media = load_server_media(state.engine, prompt.media, req.mm_processor_kwargs)
    return prompt, {"prompt_token_ids": ids, "multi_modal_data": media}


async def start_chat(
    state: ServerState, req: ChatCompletionRequest, params, rid: str, prompt_param: str,
    model: str, fit_max_tokens: bool = False,
) -> tuple[ChatPrompt, Any]:
    """Render and tokenize the chat, compile its constraint (response_format, tool_choice)
    into `params`, queue it as request `rid` for `model` (state.check_model's answer) -> (the
    prompt, its output stream). fit_max_tokens: a max_tokens beyond the context left after the
    prompt becomes what is left (Anthropic clients send 32,000 whatever the server's context)
    instead of a context_length_exceeded error."""
    prompt, ids = await state.offload(prepare_chat, state, req)
    prompt.num_tokens = len(ids) if isinstance(ids, list) else None
    params.cache_points = prompt.cache_points
    if fit_max_tokens and prompt.num_tokens and params.max_tokens is not None:
        room = (state.context_len or 0) - prompt.num_tokens
        if 0 < room < params.max_tokens:
            params.max_tokens = room
    spec, spec_param = request_constraint(
        req, thinking=prompt.thinking, tools=prompt.tools,
        tokenizer=getattr(state.engine, "tokenizer", None),
    )  # fmt: skip
    await precompile(state.engine, spec, spec_param)
    params.structured_outputs = spec
    return prompt, await add_to_engine(state, [(rid, ids, params)], prompt_param, model)


def _logprobs_n(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    if not req.logprobs:
        return None
    return req.top_logprobs or 0


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req: ChatCompletionRequest = await state.read_request(request, ChatCompletionRequest)
    model = state.check_model(req.model)
    top_n = _logprobs_n(req)
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    try:
        params = req.sampling_params(max_tokens, top_n, state.default_sampling)
    except SamplingParamsError as e:
        param = "top_logprobs" if e.param == "logprobs" else e.param
        raise APIError(str(e), param=param) from None
    rid = random_id("chatcmpl")
    prompt, stream = await start_chat(state, req, params, rid, "messages", model)
    tracker = state.metrics.tracker()
    created = int(time.time())
    builders = [ChoiceBuilder(prompt.thinking, prompt.tools) for _ in range(params.n)]
    echo = _echo_text(req)
    as_ids = req.return_tokens_as_token_ids

    def chunk(choices: list[dict], usage: dict | None = None, prompt_lps=None, prompt_ids=None
              ) -> str:  # fmt: skip
        body: dict[str, Any] = {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices,
        }  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        if prompt_ids is not None:  # (vLLM's return_token_ids: the prompt's, in the first chunk)
            body["prompt_token_ids"] = prompt_ids
        if prompt_lps is not None:  # (vLLM's prompt_logprobs: in the first output's chunk)
            body["prompt_logprobs"] = prompt_logprobs_json(state, prompt_lps)
        return sse(body)

    if req.stream:

        async def events():
            thought = [""] * params.n  # each choice's reasoning text (for the usage)
            first = {"role": "assistant", "content": echo}
            first_chunk = [_choice(i, dict(first)) for i in range(params.n)]
            if not req.return_token_ids:
                yield chunk(first_chunk)
            async for out in stream:
                raise_for_error(out, rid)
                tracker.on_output(out)
                if first_chunk and req.return_token_ids:  # (the prompt ids come with the first)
                    yield chunk(first_chunk, prompt_ids=out.prompt_token_ids)
                first_chunk = None
                choices = []
                for o in out.outputs:
                    b = builders[o.index]
                    delta = b.feed(o.text)
                    finish = None
                    if o.finish_reason is not None:
                        delta = b.merge(delta, b.finish())
                        finish = b.finish_reason(o.finish_reason)
                    thought[o.index] += delta.get("reasoning_content", "")
                    if not req.include_reasoning:
                        delta.pop("reasoning_content", None)
                    lp = None
                    if top_n is not None and o.logprobs:
                        lp = {"content": chat_logprobs(state, o.logprobs, top_n, as_ids)}
                    ids = o.token_ids if req.return_token_ids else None
                    if delta or lp or finish or ids:
                        c = _choice(o.index, delta, lp, finish, o.stop_reason)
                        if ids is not None:
                            c["token_ids"] = list(ids)
                        choices.append(c)
                if choices or out.prompt_logprobs is not None:
                    usage = tracker.usage() if req.continuous_usage else None
                    yield chunk(choices, usage=usage, prompt_lps=out.prompt_logprobs)
            tracker.done()
            if req.include_usage:
                usage = await state.offload(with_reasoning_tokens, state, tracker.usage(), thought)
                yield chunk([], usage=usage)

        return SSEResponse(events(), stream.abort, request_id_of(request))

    texts = [""] * params.n
    token_ids: list[list[int]] = [[] for _ in range(params.n)]
    prompt_ids = None
    lps: list[list] = [[] for _ in range(params.n)]
    finish: list[str | None] = [None] * params.n
    stop_reason: list[Any] = [None] * params.n
    prompt_lps = None
    async with aclosing(collect(request, stream, state.config.disconnect_poll_s)) as outs:
        try:
            async for out in outs:
                raise_for_error(out, rid)
                tracker.on_output(out)
                prompt_lps = out.prompt_logprobs or prompt_lps
                prompt_ids = out.prompt_token_ids
                for o in out.outputs:
                    texts[o.index] += o.text
                    token_ids[o.index].extend(o.token_ids)
                    lps[o.index].extend(o.logprobs or [])
                    finish[o.index] = o.finish_reason or finish[o.index]
                    if o.stop_reason is not None:
                        stop_reason[o.index] = o.stop_reason
        except EngineDeadError as e:
            raise engine_dead_error(e) from None
    tracker.done()
    choices = []
    for i, b in enumerate(builders):
        message = b.message(texts[i])
        if echo:
            message.content = echo + (message.content or "")
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs={"content": chat_logprobs(state, lps[i], top_n, as_ids)}
                if top_n is not None
                else None,
                finish_reason=b.finish_reason(finish[i]) if finish[i] else None,
                stop_reason=stop_reason[i],
                token_ids=token_ids[i] if req.return_token_ids else None,
            )
        )
    thought = [c.message.reasoning_content or "" for c in choices]
    if not req.include_reasoning:  # (still counted in the usage's reasoning_tokens)
        for c in choices:
            c.message.reasoning_content = None
    usage = await state.offload(with_reasoning_tokens, state, tracker.usage(), thought)
    body = ChatCompletionResponse(
        id=rid, created=created, model=model, choices=choices, usage=Usage(**usage),
        prompt_logprobs=prompt_logprobs_json(state, prompt_lps),
        prompt_token_ids=list(prompt_ids or []) if req.return_token_ids else None,
    )  # fmt: skip
    return JSONResponse(body.model_dump())


def _echo_text(req: ChatCompletionRequest) -> str:
    """vLLM's `echo` for chat: the final message's text goes before the reply when that message
    is the assistant's (a reply the model continues under continue_final_message)."""
    last = req.messages[-1] if req.echo and req.messages else None
    if last is None or last.role != "assistant":
        return ""
    if isinstance(last.content, list):
        return "".join(p["text"] for p in last.content if isinstance(p.get("text"), str))
    return last.content or ""


def _choice(
    index: int,
    delta: dict,
    logprobs: dict | None = None,
    finish: str | None = None,
    stop_reason: Any = None,
) -> dict:
    out = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        out["stop_reason"] = stop_reason
    return out
