"""Qwen 3.5 tool calls in model output -> OpenAI tool calls, whole or streamed.

The format (docs: chat-format.md): `<tool_call>\n<function=NAME>\n` + per argument
`<parameter=KEY>\nVALUE\n</parameter>\n` + `</function>\n</tool_call>`; values are typed by the
tool's JSON schema. A JSON body (`{"name": ..., "arguments": {...}}`, the Qwen 3 style) is
accepted too. Malformed or unclosed calls stay text; nothing here raises on model output.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]*)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>")


def _partial_tag(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag (0 if none)."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


def _properties(tools: list[Any] | None) -> dict[str, dict[str, Any]]:
    """Tool name -> its parameters' JSON-schema properties."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        if callable(getattr(tool, "model_dump", None)):
            tool = tool.model_dump()
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            props = (fn.get("parameters") or {}).get("properties")
            out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    return [x for s in schema.get("anyOf") or schema.get("oneOf") or [] for x in _schema_types(s)]


def convert_value(raw: str, schema: Any = None) -> Any:
    """A parameter's text -> a JSON value, following the schema's type when there is one."""
    s = raw.strip()
    types = _schema_types(schema)
    if "null" in types and s in ("null", "None"):  # the template writes None as `None`
        return None
    for t in types:
        if t == "string":
            return raw
        if t == "boolean" and s.lower() in ("true", "false"):
            return s.lower() == "true"
        if t in ("integer", "number"):
            try:
                return int(s)
            except ValueError:
                pass
            try:
                v = float(s)
                if math.isfinite(v) and t == "number":
                    return v
                if math.isfinite(v) and v.is_integer():
                    return int(v)
            except ValueError:
                pass
        if t in ("object", "array"):
            want = dict if t == "object" else list
            for load in (_json, ast.literal_eval):  # the template writes Python str() too
                try:
                    v = load(s)
                    json.dumps(v, allow_nan=False)  # literal_eval also makes sets, bytes, ...
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                if isinstance(v, want):
                    return v
    try:
        return _json(s)
    except (ValueError, RecursionError):
        return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(s: str) -> Any:
    """json.loads without NaN / Infinity (not JSON; clients in other languages reject them)."""
    return json.loads(s, parse_constant=_no_constant)


# A call: `<tool_call>\n<function=NAME>\n` + per argument `<parameter=KEY>\nVALUE\n</parameter>\n`
# + `</function>\n</tool_call>` (docs: chat-format.md). A value may contain any text, tags too
# (a coding agent writing this very format), so a closing tag only counts where what follows
# continues the call: `</parameter>` before `<parameter=KEY>` (a parameter of the tool not given
# yet) or before `</function>` that ends the body; `</tool_call>` after such a body.
# Forms the model sometimes slips into (no `</parameter>`, no `</function>`) are accepted only
# when their `</tool_call>` ends the output or another call follows it.
_PARAM_CLOSE, _FUNCTION_CLOSE = "</parameter>", "</function>"
_PARAMETER_LINE = re.compile(r"\n<parameter=([^>\n]*)>")


_WS = re.compile(r"\s*")


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


def _ends_body(body: str, pos: int) -> bool:
    """`</function>` at pos (after whitespace) with only whitespace after it."""
    pos = _skip_ws(body, pos)
    return body.startswith(_FUNCTION_CLOSE, pos) and _skip_ws(
        body, pos + len(_FUNCTION_CLOSE)
    ) == len(body)


def _value_end(body: str, start: int, ok_key) -> tuple[int, int, bool]:
    """Where the value starting at `start` ends: (end of value, where parsing goes on, strict)."""
    i = body.find(_PARAM_CLOSE, start)
    while i >= 0:
        after = i + len(_PARAM_CLOSE)
        nxt = _PARAMETER.match(body, _skip_ws(body, after))
        if _ends_body(body, after) or (nxt is not None and ok_key(nxt.group(1).strip())):
            return i, after, True
        if _skip_ws(body, after) == len(body):  # </parameter>, then nothing: no </function>
            return i, after, False
        i = body.find(_PARAM_CLOSE, i + 1)
    # no </parameter> closes it: the next line starting a new parameter, a final </function>,
    # or the end of the body
    for m in _PARAMETER_LINE.finditer(body, start):
        if ok_key(m.group(1).strip()):
            return m.start() + 1, m.start() + 1, False
    j = body.rfind(_FUNCTION_CLOSE, start)
    if j >= 0 and _skip_ws(body, j + len(_FUNCTION_CLOSE)) == len(body):
        return j, j, False
    return len(body), len(body), False


def _parse_xml(body: str, properties: dict[str, dict[str, Any]]):
    m = _FUNCTION.match(body, _skip_ws(body, 0))
    if m is None or not m.group(1).strip():
        return None
    name = m.group(1).strip()
    schema = properties.get(name) or {}
    args: dict[str, Any] = {}
    strict, pos = True, m.end()
    while True:
        pos = _skip_ws(body, pos)
        if body.startswith(_FUNCTION_CLOSE, pos):
            return (name, args, strict) if _ends_body(body, pos) else None
        if pos >= len(body):  # no </function>
            return name, args, False
        p = _PARAMETER.match(body, pos)
        key = p.group(1).strip() if p is not None else ""
        if not key:
            return None

        def ok_key(k: str, key: str = key) -> bool:
            return bool(k) and k != key and k not in args and (not schema or k in schema)

        start = p.end() + body.startswith("\n", p.end())  # the value sits on its own lines
        end, pos, closed = _value_end(body, start, ok_key)
        raw = body[start:end]
        raw = raw[:-1] if raw.endswith("\n") else raw
        args[key] = convert_value(raw, schema.get(key))
        strict = strict and closed


def _parse_json(body: str):
    try:
        obj = _json(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = _json(args)
        except (ValueError, RecursionError):
            return None
    return (obj["name"], args, True) if isinstance(args, dict) else None


def parse_call_body(body: str, properties: dict[str, dict[str, Any]] | None = None):
    """The text between <tool_call> and </tool_call> -> (name, arguments, strict) or None.

    XML (Qwen 3.5) or a JSON object `{"name": ..., "arguments": {...}}` (the Qwen 3 style).
    strict: every closing tag is there; otherwise the call is lenient (see above).
    """
    if body.lstrip().startswith("{"):
        return _parse_json(body)
    return _parse_xml(body, properties or {})


_NEED_MORE, _NOT_A_CALL = "need more", "not a call"


def scan_call(buf: str, properties: dict[str, dict[str, Any]], final: bool, pos: int = 0):
    """buf starts with <tool_call>. -> (result, resume): result is (end, name, args) with end just
    past the call's </tool_call>, _NOT_A_CALL, or _NEED_MORE (only when not final: the answer
    depends on text not seen yet). `resume`: where to look for the next </tool_call> next time,
    past candidates already refused (a refusal never changes when more text comes)."""
    start = len(CALL_OPEN)
    wait = _NOT_A_CALL if final else _NEED_MORE
    k = _skip_ws(buf, start)
    head = buf[k : k + 64]
    if not head:
        return wait, start
    if head.startswith("<function="):
        m = _FUNCTION.match(buf, k)
        if m is None:
            rest = buf[k + len("<function=") :]
            return (wait if ">" not in rest and "\n" not in rest else _NOT_A_CALL), start
        if not m.group(1).strip():
            return _NOT_A_CALL, start
    elif "<function=".startswith(head):
        return wait, start
    elif not head.startswith("{"):
        return _NOT_A_CALL, start
    pos = max(pos, start)
    while True:
        j = buf.find(CALL_CLOSE, pos)
        if j < 0:
            return wait, max(start, len(buf) - len(CALL_CLOSE) + 1)
        end = j + len(CALL_CLOSE)
        parsed = None
        e = j
        while e > start and buf[e - 1].isspace():
            e -= 1
        if buf.endswith(_FUNCTION_CLOSE, start, e) or head.startswith("{"):  # may be strict
            parsed = parse_call_body(buf[start:j], properties)
            if parsed is not None and parsed[2]:
                return (end, parsed[0], parsed[1]), end
        # a lenient call: only when the output ends here or another call follows
        k = _skip_ws(buf, end)
        follow = buf[k : k + len(CALL_OPEN)]
        if follow == CALL_OPEN or (k == len(buf) and final):
            if parsed is None:
                parsed = parse_call_body(buf[start:j], properties)
            if parsed is not None:
                return (end, parsed[0], parsed[1]), end
        elif not final and k + len(follow) == len(buf) and CALL_OPEN.startswith(follow):
            return _NEED_MORE, j  # "" too: the output may end here
        pos = end


def _tool_call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


class ToolCallParser:
    """Extracts tool calls from text; the rest is content.

    Whitespace that only separates content from a call is dropped (the template writes
    `content\n\n<tool_call>...</tool_call>\n<tool_call>...`): text before a call is
    right-stripped, text after a call left-stripped, and text on both sides of calls is joined
    by one newline. `parse` is `feed` + `finish` of the whole text, so a stream gives the same
    result however it is split.
    """

    def __init__(self, tools: list[Any] | None = None) -> None:
        self.properties = _properties(tools)
        self._buf = ""
        self._in_call = False
        self._scan = 0  # in a call: where to resume looking for </tool_call>
        self._ws = ""  # trailing whitespace of the content, held until we know what follows
        self._after_call = False
        self._emitted = False  # any content so far (text after a call then starts with "\n")
        self.num_calls = 0

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Non-streaming: (content, tool_calls)."""
        p = ToolCallParser()
        p.properties = self.properties
        content, calls = p.feed(text)
        rest, more = p.finish()
        return content + rest, [{k: v for k, v in c.items() if k != "index"} for c in calls + more]

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """Streaming: (content delta, completed tool calls with their `index`)."""
        self._buf += delta
        return self._drain(final=False)

    def _drain(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        out: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                i = self._buf.find(CALL_OPEN)
                if i < 0:
                    keep = 0 if final else _partial_tag(self._buf, CALL_OPEN)
                    out.append(self._text(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                out.append(self._text(self._buf[:i]))
                self._buf, self._in_call, self._scan = self._buf[i:], True, 0
            result, self._scan = scan_call(self._buf, self.properties, final, self._scan)
            if result == _NEED_MORE:
                break
            self._in_call = False
            if result == _NOT_A_CALL:  # the tag is text; look for a call after it
                out.append(self._text(CALL_OPEN))
                self._buf = self._buf[len(CALL_OPEN) :]
                continue
            end, name, args = result
            self._buf = self._buf[end:]
            self._ws, self._after_call = "", True
            calls.append({"index": self.num_calls, **_tool_call(name, args)})
            self.num_calls += 1
        return "".join(out), calls

    def _text(self, s: str) -> str:
        if self._after_call:
            s = s.lstrip()
            if not s:
                return ""
            self._after_call = False
            s = "\n" + s if self._emitted else s
        if not s:
            return ""
        s = self._ws + s
        body = s.rstrip()
        self._ws = s[len(body) :]
        self._emitted = self._emitted or bool(body)
        return body

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """End of output: calls that only the end completes; held text and unclosed calls
        become content."""
        content, calls = self._drain(final=True)
        text = content + self._ws
        self._ws = ""
        return text, calls
