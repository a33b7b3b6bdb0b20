"""POST /v1/completions: raw prompts (text, token ids, or a batch of either), streamed or not."""

from __future__ import annotations

import dataclasses
import time
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from qwen35.request import SamplingParamsError
from qwen35.server.async_engine import EngineDeadError
from qwen35.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    random_id,
)
from qwen35.server.serving_common import (
    JSONResponse,
    ServerState,
    SSEResponse,
    add_to_engine,
    collect,
    completion_logprobs,
    engine_dead_error,
    raise_for_error,
    request_id_of,
    sse,
)
from qwen35.server.structured import precompile, request_constraint


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)  # a batch: list[str] or list[list[int]]


def prepare_prompts(
    state: ServerState, prompts: list[str | list[int]], echo: bool
) -> tuple[list[list[int]], list[str] | None]:
    """Token ids of every prompt (and their text for echo), on a worker thread."""
    ids = [state.encode(p, "prompt") for p in prompts]
    if not echo:
        return ids, None
    tok = state.engine.tokenizer
    return ids, [p if isinstance(p, str) else tok.decode(p) for p in prompts]


async def create_completion(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = await state.read_request(request, CompletionRequest)
    model = state.check_model(req.model)
    prompts = _prompts(req.prompt)
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if req.echo and req.logprobs is not None:
        raise APIError("echo with logprobs is not supported (no prompt logprobs)", param="echo")
    try:
        params = req.sampling_params(req.max_tokens, req.logprobs, state.default_sampling)
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.param) from None
    params.structured_outputs, spec_param = request_constraint(req)
    await precompile(state.engine, params.structured_outputs, spec_param)
    ids, texts = await state.offload(prepare_prompts, state, prompts, req.echo)
    base = random_id("cmpl")
    requests = [(f"{base}-{i}", p, dataclasses.replace(params)) for i, p in enumerate(ids)]
    order = {rid: i for i, (rid, _, _) in enumerate(requests)}
    echo = {rid: text for (rid, _, _), text in zip(requests, texts or [], strict=False)}
    stream = await add_to_engine(state, requests, "prompt")
    tracker = state.metrics.tracker()
    created = int(time.time())
    top_n = req.logprobs or 0

    def choice_index(rid: str, index: int) -> int:
        return order[rid] * params.n + index

    if req.stream:

        async def events():
            offsets: dict[int, int] = {}  # choice -> text length so far (logprobs text_offset)
            async for out in stream:
                raise_for_error(out, out.request_id)
                tracker.on_output(out)
                choices = []
                for o in out.outputs:
                    i = choice_index(out.request_id, o.index)
                    text = o.text
                    if i not in offsets and out.request_id in echo:
                        text = echo[out.request_id] + text
                    prev = offsets.get(i, 0)
                    offsets[i] = prev + len(text)
                    lp = None  # (echo never comes with logprobs)
                    if o.logprobs is not None and req.logprobs is not None:
                        lp = completion_logprobs(state, o.logprobs, top_n, prev)
                    choices.append(
                        {"index": i, "text": text, "logprobs": lp,
                         "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                    )  # fmt: skip
                if choices:
                    yield sse(_chunk(base, created, model, choices))
            tracker.done()
            if req.include_usage:
                yield sse(_chunk(base, created, model, [], usage=tracker.usage()))

        return SSEResponse(events(), stream.abort, request_id_of(request))

    acc: dict[int, dict[str, Any]] = {}
    async with aclosing(collect(request, stream, state.config.disconnect_poll_s)) as outs:
        try:
            async for out in outs:
                raise_for_error(out, out.request_id)
                tracker.on_output(out)
                for o in out.outputs:
                    i = choice_index(out.request_id, o.index)
                    a = acc.setdefault(
                        i, {"text": echo.get(out.request_id, ""), "lps": [], "finish": None}
                    )
                    a["text"] += o.text
                    a["lps"].extend(o.logprobs or [])
                    a["finish"] = o.finish_reason or a["finish"]
                    if o.stop_reason is not None:
                        a["stop"] = o.stop_reason
        except EngineDeadError as e:
            raise engine_dead_error(e) from None
    tracker.done()
    choices = [
        CompletionChoice(
            index=i,
            text=a["text"],
            logprobs=completion_logprobs(state, a["lps"], top_n, 0)
            if req.logprobs is not None
            else None,
            finish_reason=a["finish"],
            stop_reason=a.get("stop"),
        )
        for i, a in sorted(acc.items())
    ]
    body = CompletionResponse(
        id=base, created=created, model=model, choices=choices, usage=Usage(**tracker.usage())
    )
    return JSONResponse(body.model_dump())


def _chunk(base: str, created: int, model: str, choices: list, usage: dict | None = None) -> dict:
    chunk: dict[str, Any] = {
        "id": base,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk
