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
    prompt_logprobs_json,
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
    state: ServerState, prompts: list[str | list[int]], echo: bool, truncate: int | None = None
) -> tuple[list[list[int]], list[str] | None]:
    """Token ids of every prompt (and their text for echo), on a worker thread."""
    ids = [state.encode(p, "prompt", truncate) for p in prompts]
    if not echo:
        return ids, None
    tok = state.engine.tokenizer
    if truncate is not None:  # echo what the model read
        return ids, [tok.decode(i) for i in ids]
    return ids, [p if isinstance(p, str) else tok.decode(p) for p in prompts]


async def create_completion(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = await state.read_request(request, CompletionRequest)
    model = state.check_model(req.model)
    prompts = _prompts(req.prompt)
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    # max_tokens 0 with echo: only the prompt (scored with logprobs: lm-evaluation-harness's
    # loglikelihood requests); the engine generates one token, which is dropped
    prompt_only = req.echo and req.max_tokens == 0
    if req.max_tokens == 0 and not req.echo:
        raise APIError("max_tokens must be at least 1 (0 only with echo: the prompt alone)",
                       param="max_tokens")  # fmt: skip
    try:
        params = req.sampling_params(
            1 if prompt_only else req.max_tokens, req.logprobs, state.default_sampling
        )
        if req.echo and req.logprobs is not None:  # the prompt's logprobs are echoed too
            params.prompt_logprobs = max(req.logprobs, params.prompt_logprobs or 0)
            params.validate()
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.param) from None
    params.structured_outputs, spec_param = request_constraint(req)
    await precompile(state.engine, params.structured_outputs, spec_param)
    ids, texts = await state.offload(prepare_prompts, state, prompts, req.echo,
                                     params.truncate_prompt_tokens)  # fmt: skip
    base = random_id("cmpl")
    requests = [(f"{base}-{i}", p, dataclasses.replace(params)) for i, p in enumerate(ids)]
    order = {rid: i for i, (rid, _, _) in enumerate(requests)}
    echo = {rid: text for (rid, _, _), text in zip(requests, texts or [], strict=False)}
    stream = await add_to_engine(state, requests, "prompt", model)
    tracker = state.metrics.tracker()
    created = int(time.time())
    top_n = req.logprobs or 0
    as_ids = req.return_tokens_as_token_ids

    def choice_index(rid: str, index: int) -> int:
        return order[rid] * params.n + index

    prompt_lps: dict[str, list] = {}  # request id -> its prompt logprobs (its first output's)
    prompt_ids = {rid: p for rid, p, _ in requests}

    def receive(out) -> None:
        raise_for_error(out, out.request_id)
        if out.prompt_logprobs is not None:
            prompt_lps[out.request_id] = out.prompt_logprobs
        if prompt_only:
            for o in out.outputs:  # (the token generated to run the prompt: not returned)
                o.text, o.token_ids = "", []
                o.logprobs = [] if o.logprobs is not None else None
                if o.finish_reason is not None:
                    o.finish_reason, o.stop_reason = "length", None
        tracker.on_output(out)

    def echo_logprobs(rid: str) -> dict[str, list] | None:
        """Legacy logprobs of an echoed prompt (its first token has none), or None."""
        if not req.echo or req.logprobs is None or rid not in prompt_lps:
            return None
        ids = prompt_ids[rid]
        return completion_logprobs(state, prompt_lps[rid][1:], top_n, 0, first=ids[0],
                                   as_ids=as_ids)  # fmt: skip

    if req.stream:

        async def events():
            offsets: dict[int, int] = {}  # choice -> text length so far (logprobs text_offset)
            async for out in stream:
                receive(out)
                rid, choices = out.request_id, []
                for o in out.outputs:
                    i = choice_index(rid, o.index)
                    text, first = o.text, i not in offsets
                    if first and rid in echo:
                        text = echo[rid] + text
                    prev = offsets.get(i, 0) if not first or rid not in echo else len(echo[rid])
                    offsets[i] = prev + len(o.text)
                    lp = None
                    if o.logprobs is not None and req.logprobs is not None:
                        lp = completion_logprobs(state, o.logprobs, top_n, prev, as_ids=as_ids)
                    if first and (pre := echo_logprobs(rid)) is not None:
                        lp = {k: pre[k] + (lp or {}).get(k, []) for k in pre}
                    c = {"index": i, "text": text, "logprobs": lp,
                         "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}  # fmt: skip
                    if first and req.prompt_logprobs is not None:
                        c["prompt_logprobs"] = prompt_logprobs_json(state, prompt_lps.get(rid))
                    if req.return_token_ids:  # (vLLM's: the prompt's with a choice's first)
                        c["token_ids"] = list(o.token_ids)
                        if first:
                            c["prompt_token_ids"] = list(out.prompt_token_ids)
                    choices.append(c)
                if choices:
                    usage = tracker.usage() if req.continuous_usage else None
                    yield sse(_chunk(base, created, model, choices, usage=usage))
            tracker.done()
            if req.include_usage:
                yield sse(_chunk(base, created, model, [], usage=tracker.usage()))

        return SSEResponse(events(), stream.abort, request_id_of(request))

    acc: dict[int, dict[str, Any]] = {}
    async with aclosing(collect(request, stream, state.config.disconnect_poll_s)) as outs:
        try:
            async for out in outs:
                receive(out)
                for o in out.outputs:
                    i = choice_index(out.request_id, o.index)
                    a = acc.setdefault(
                        i, {"text": echo.get(out.request_id, ""), "lps": [], "finish": None,
                            "rid": out.request_id, "ids": [],
                            "prompt_ids": list(out.prompt_token_ids)}
                    )  # fmt: skip
                    a["text"] += o.text
                    a["ids"].extend(o.token_ids)
                    a["lps"].extend(o.logprobs or [])
                    a["finish"] = o.finish_reason or a["finish"]
                    if o.stop_reason is not None:
                        a["stop"] = o.stop_reason
        except EngineDeadError as e:
            raise engine_dead_error(e) from None
    tracker.done()
    choices = []
    for i, a in sorted(acc.items()):
        rid, lp = a["rid"], None
        if req.logprobs is not None:
            lp = completion_logprobs(state, a["lps"], top_n, len(echo.get(rid, "")),
                                     as_ids=as_ids)  # fmt: skip
            if (pre := echo_logprobs(rid)) is not None:
                lp = {k: pre[k] + lp[k] for k in pre}
        choices.append(
            CompletionChoice(
                index=i,
                text=a["text"],
                logprobs=lp,
                finish_reason=a["finish"],
                stop_reason=a.get("stop"),
                prompt_logprobs=prompt_logprobs_json(state, prompt_lps.get(rid))
                if req.prompt_logprobs is not None
                else None,
                token_ids=a["ids"] if req.return_token_ids else None,
                prompt_token_ids=a["prompt_ids"] if req.return_token_ids else None,
            )
        )
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
