"""Request bodies: read on the event loop (bounded by --max-body-bytes), then parsed, checked and
validated by `parse_request` on a worker thread, so a large body never stalls other streams.

Every problem is an APIError in OpenAI's shape: 413 for a body over the limit, 400 for invalid
JSON, nesting deeper than the limit, lone surrogates, limits (limits.py) and field types.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request

from qwen35.server.limits import RequestLimits, check_json, check_request_size
from qwen35.server.protocol import APIError, ChatMessage

# long message lists are validated in slices: pydantic holds the GIL for a whole call, and a
# 200k-message body would freeze the event loop for ~0.6 s in one call
_SLICE = 512
_MESSAGES = TypeAdapter(list[ChatMessage])


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(size, max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:  # the client left (or timed out) mid-body: nobody reads the answer
        raise APIError("the client closed the connection before sending the body") from None
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        f"request body of {size}+ bytes exceeds the limit of {limit} bytes (--max-body-bytes)",
        413,
        code="request_too_large",
    )


def parse_request(
    raw: bytes,
    model_cls: type[BaseModel],
    limits: RequestLimits,
    prompt_limit: int,
    context: int | None,
) -> Any:
    """JSON -> checks -> validated `model_cls` (runs on a worker thread)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(
            f"the request body nests deeper than {limits.max_json_depth} levels",
            code="nested_too_deeply",
        ) from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    check_json(data, limits.max_json_depth)
    check_request_size(data, limits, prompt_limit, context)
    messages = data.get("messages")
    sliced = isinstance(messages, list) and len(messages) > _SLICE
    if sliced:
        data = {**data, "messages": []}
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    if sliced:
        validated: list[ChatMessage] = []
        for start in range(0, len(messages), _SLICE):
            try:
                validated += _MESSAGES.validate_python(messages[start : start + _SLICE])
            except ValidationError as e:
                raise validation_error(e, ("messages",), start) from None
        req.messages = validated
    return req


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "NamedToolChoice"}


def validation_error(e: ValidationError, prefix: tuple = (), offset: int = 0) -> APIError:
    """The first error as a 400 naming the field (`messages[3].role`); `prefix`/`offset` place
    errors of a slice validated on its own."""
    errors = e.errors()
    err = errors[0]
    loc = list(err.get("loc", ()))
    if prefix:
        loc = [*prefix, loc[0] + offset, *loc[1:]] if loc else list(prefix)
    # pydantic's loc names each alternative of a union ('str', 'list[int]', ...): drop those
    loc = [
        str(x) for x in loc if isinstance(x, int) or not (x in _TYPE_TAGS or "[" in x or "-" in x)
    ]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    msg = err.get("msg", "invalid value")
    if len({tuple(x.get("loc", ()))[:1] for x in errors}) == 1 and len(errors) > 1:
        kinds = sorted({x["type"] for x in errors})
        msg = f"{msg} (or one of the other accepted forms; {len(errors)} mismatches: {kinds})"
    return APIError(f"invalid value for {param or 'the body'}: {msg}", param=param)
