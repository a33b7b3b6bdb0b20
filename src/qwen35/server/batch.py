"""Offline batches in the OpenAI Batch API's file format (`qwen35 run-batch`, as vLLM's).

Each input line is one request, `{"custom_id": ..., "method": "POST", "url":
"/v1/chat/completions", "body": {...}}` (url: /v1/chat/completions, /v1/completions or
/v1/responses); each output line its result, in input order:
`{"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": ...,
"body": {...}}, "error": null}`. A request the server refuses gets its status and OpenAI error
body under `response` and that error's code and message under `error`; a line that is not a
request (not JSON, no custom_id, a repeated custom_id, another url, `"stream": true`) gets
`"response": null` and an error naming the line.

The requests run through the server's own app (server/app.py), called in process without a
socket, so a line gets exactly what `qwen35 serve` would answer; up to `window` requests are in
flight at once and the engine batches them continuously.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qwen35.errors import shown

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MAX_CUSTOM_ID = 512  # characters (OpenAI allows 64; vLLM does not limit it)
PENDING_WINDOWS = 8  # results kept for in-order output: at most this many windows' worth


@dataclass
class BatchCounts:
    total: int = 0
    completed: int = 0  # answered 200
    failed: int = 0


class LineError(Exception):
    """A line that is not a runnable request (answered with `response: null`)."""

    def __init__(self, message: str, code: str = "invalid_request", custom_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id  # the line's, where it had a usable one


def parse_line(line: str, lineno: int, seen: set[str]) -> tuple[str | None, str, bytes]:
    """(custom_id, url, body bytes) of an input line; raises LineError(message naming the line).
    The custom_id comes back with the error where the line had a usable one."""
    try:
        item = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise LineError(f"line {lineno}: not JSON ({_short(e)})") from None
    if not isinstance(item, dict):
        raise LineError(f"line {lineno}: a request must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise LineError(
            f"line {lineno}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} "
            "characters (it matches a result to its request)"
        )
    if custom_id in seen:
        raise LineError(f"line {lineno}: custom_id {custom_id!r} repeats an earlier line's; "
                        "each request needs its own", "duplicate_custom_id", custom_id)  # fmt: skip
    seen.add(custom_id)
    method = item.get("method", "POST")
    url = item.get("url")
    if method != "POST" or url not in URLS:
        raise LineError(f"line {lineno}: {method!r} {url!r} is not a batch endpoint; use "
                        f"\"method\": \"POST\" and a url of {', '.join(URLS)}",
                        custom_id=custom_id)  # fmt: skip
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineError(f"line {lineno}: body must be a JSON object", custom_id=custom_id)
    if body.get("stream"):
        raise LineError(f"line {lineno}: \"stream\": true is not supported in a batch (each "
                        "result is written whole); leave it out", custom_id=custom_id)  # fmt: skip
    return custom_id, url, json.dumps(body).encode()


def _short(e: BaseException) -> str:
    return shown(e, 200)


def result_line(custom_id: str | None, status: int | None, request_id: str | None,
                body: Any, error: dict | None) -> dict:  # fmt: skip
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": response, "error": error}  # fmt: skip


async def call_app(app: Any, url: str, body: bytes) -> tuple[int, str | None, Any]:
    """POST `body` to `url` on an ASGI app in process: (status, x-request-id, JSON body)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": url, "raw_path": url.encode(), "query_string": b"",
        "root_path": "", "client": ("run-batch", 0), "server": ("run-batch", 0),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    delivered = False
    never = asyncio.Event()  # the "client" never disconnects

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    status, request_id, chunks = 500, None, []

    async def send(message: dict) -> None:
        nonlocal status, request_id
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", []):
                if name == b"x-request-id":
                    request_id = value.decode()
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, request_id, json.loads(raw)
    except ValueError:
        return status, request_id, {"error": {"message": raw.decode("utf-8", "replace"),
                                              "type": "server_error"}}  # fmt: skip


def error_of(body: Any) -> dict:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return {"code": "server_error", "message": str(body)[:500]}
    return {"code": err.get("code") or err.get("type"), "message": err.get("message")}


async def run_batch(
    app: Any,
    lines: Iterable[str],
    window: int,
    on_result: Callable[[dict, BatchCounts], None],
) -> BatchCounts:
    """Run every line of a batch through `app` (its lifespan already entered), up to `window`
    requests at once, handing each result (and the counts so far) to on_result in input order. Every line gets a
    result: after an engine failure the app answers the rest with 503s."""
    counts = BatchCounts()
    pending: dict[int, asyncio.Task | dict] = {}
    next_out = 0
    seen: set[str] = set()

    async def one(custom_id: str, url: str, body: bytes) -> dict:
        status, request_id, answer = await call_app(app, url, body)
        error = None if status == 200 else error_of(answer)
        return result_line(custom_id, status, request_id, answer, error)

    async def flush(wait: bool) -> None:
        nonlocal next_out
        while next_out in pending:
            item = pending[next_out]
            if isinstance(item, asyncio.Task):
                if not wait and not item.done():
                    return
                item = await item
            del pending[next_out]
            next_out += 1
            ok = item["response"] is not None and item["response"]["status_code"] == 200
            counts.completed += ok
            counts.failed += not ok
            on_result(item, counts)

    in_flight: set[asyncio.Task] = set()
    for index, (lineno, text) in enumerate(_lines(lines)):
        counts.total += 1
        try:
            custom_id, url, body = parse_line(text, lineno, seen)
        except LineError as e:
            err = {"code": e.code, "message": str(e)}
            pending[index] = result_line(e.custom_id, None, None, None, err)
        else:
            task = asyncio.ensure_future(one(custom_id, url, body))
            pending[index] = task
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await flush(wait=False)
        # at most `window` in flight, and at most PENDING_WINDOWS x window results held back
        # behind a slow earlier one (it is in flight, so the wait ends when it does)
        while len(in_flight) >= window or (in_flight and len(pending) >= PENDING_WINDOWS * window):
            await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            await flush(wait=False)
    await flush(wait=True)
    return counts


def _lines(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    """(line number, text) of the non-blank lines."""
    for lineno, text in enumerate(lines, 1):
        if text.strip():
            yield lineno, text

