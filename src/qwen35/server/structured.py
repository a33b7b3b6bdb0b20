"""Request fields -> the engine's `StructuredOutputs`, and compiling it before the engine sees it.

Accepted (at most one per request): OpenAI's `response_format` (`json_object`, `json_schema`);
vLLM's `structured_outputs: {json | json_object | regex | choice | grammar}` and its older
`guided_json / guided_regex / guided_choice / guided_grammar` (+ `guided_whitespace_pattern`);
on chat, `tool_choice: "required"` or a named function, which forces Qwen 3.5's tool-call
format with arguments valid against the tool's parameters (several calls for "required" when
`parallel_tool_calls`). With thinking on, the constraint starts after `</think>`.

`precompile` compiles in the engine's grammar workers while the handler awaits, so a bad or slow
constraint is a 400 naming the problem and the engine loop never waits on a compile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qwen35.engine.structured import StructuredOutputError, tool_call_grammar
from qwen35.request import SamplingParamsError, StructuredOutputs
from qwen35.server.protocol import APIError

_SO_KEYS = {"json", "json_object", "regex", "choice", "grammar", "whitespace_pattern"}


def _from_response_format(rf: dict[str, Any]) -> dict[str, Any] | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise APIError(
                'response_format json_schema needs {"json_schema": {"name", "schema"}}',
                param="response_format",
            )
        return {"json": js.get("schema") or {"type": "object"}}
    raise APIError(
        f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
        param="response_format",
    )


def request_constraint(
    req: Any,
    *,
    thinking: bool = False,
    tools: list[dict[str, Any]] | None = None,
    tokenizer: Any = None,
) -> tuple[StructuredOutputs | None, str]:
    """(the constraint or None, the request field it came from) for a chat or completion
    request; `tools` are the chat tools rendered (for tool_choice). 400 on conflicts."""
    found: list[tuple[str, dict[str, Any]]] = []
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        unknown = set(so) - _SO_KEYS
        if unknown:
            raise APIError(
                f"structured_outputs: unsupported field(s) {sorted(unknown)}; use one of "
                f"{sorted(_SO_KEYS)}",
                param="structured_outputs",
            )
        found.append(("structured_outputs", dict(so)))
    for kind in ("json", "regex", "choice", "grammar"):
        v = getattr(req, f"guided_{kind}", None)
        if v is not None:
            found.append((f"guided_{kind}", {kind: v}))
    rf = getattr(req, "response_format", None)
    if rf:
        fields = _from_response_format(rf)
        if fields is not None:
            found.append(("response_format", fields))
    choice = getattr(req, "tool_choice", None)
    if tools and (choice == "required" or (choice is not None and not isinstance(choice, str))):
        try:
            grammar = tool_call_grammar(
                tools,
                multiple=choice == "required" and bool(getattr(req, "parallel_tool_calls", True)),
                call_open_id=getattr(tokenizer, "tool_call_start_id", None),
                call_close_id=getattr(tokenizer, "tool_call_end_id", None),
            )
        except Exception as e:  # noqa: BLE001 - malformed tool parameters are the client's
            raise APIError(
                f"tools: cannot build the tool-call grammar: {e!r}", param="tools"
            ) from None
        found.append(("tool_choice", {"grammar": grammar}))
    if not found:
        return None, ""
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(f"only one output constraint per request, got {names}", param=found[1][0])
    param, fields = found[0]
    ws = getattr(req, "guided_whitespace_pattern", None)
    if ws is not None and "whitespace_pattern" not in fields:
        fields["whitespace_pattern"] = ws
    try:
        spec = StructuredOutputs(**fields, after_think=thinking).validate(param)
    except SamplingParamsError as e:
        raise APIError(str(e), param=param) from None
    return spec, param


async def precompile(engine: Any, spec: StructuredOutputs | None, param: str) -> None:
    """Compile `spec` in the engine's grammar workers (cached), or raise a 400 naming `param`."""
    manager = getattr(engine, "structured", None)
    if spec is None or manager is None:
        return
    compiler = manager.compiler
    await asyncio.wrap_future(compiler.ll_tokenizer_future())  # once per process
    try:
        await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(manager.prepare(spec))), compiler.timeout_s
        )
    except asyncio.TimeoutError:
        raise APIError(
            f"compiling the {param} constraint took longer than {compiler.timeout_s:g} s; "
            "simplify it",
            param=param,
        ) from None
    except StructuredOutputError as e:
        raise APIError(str(e), param=param) from None
