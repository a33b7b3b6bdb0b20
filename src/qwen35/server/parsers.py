"""Reasoning and tool-call parsing of Qwen 3.5 chat output, whole or streamed.

- `ReasoningParser`: with thinking on, the prompt ends inside `<think>\\n`, so the output is
  `reasoning\\n</think>\\n\\ncontent`; with thinking off everything is content, at once (vLLM's
  streaming parser waited for a `</think>` that never came: peers.md §4 #8).
- `ToolCallParser`: Qwen 3.5's XML calls, `<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n
  </parameter>\\n</function>\\n</tool_call>`, into OpenAI tool calls, values typed by the tool's
  JSON schema. Malformed or unclosed calls stay text; nothing here raises on model output.
- `ChatOutputParser`: both, with calls extracted from the reasoning too (a call the model writes
  inside `<think>` is still a call: peers.md §4 #7).

Streaming holds back only what may be the start of a tag (`</think>`, `<tool_call>`) and
whitespace whose fate depends on what follows, so the concatenated deltas always equal the
non-streaming parse of the whole text, however the text was split.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from typing import Any, NamedTuple

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]*)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>")


def _partial_tag(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag (0 if none)."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


# ---- reasoning ------------------------------------------------------------------------------
class ReasoningParser:
    """Splits output into reasoning and content; see the module docstring."""

    def __init__(self, thinking_enabled: bool) -> None:
        self.thinking_enabled = thinking_enabled
        self._state = "start" if thinking_enabled else "content"
        self._buf = ""
        self._nl = ""  # trailing newlines of the reasoning: dropped if </think> follows
        self._started = False  # any reasoning emitted yet (leading newlines are dropped)

    @staticmethod
    def split(text: str, thinking_enabled: bool) -> tuple[str | None, str]:
        """Non-streaming: (reasoning or None, content)."""
        if not thinking_enabled:
            return None, text
        if text.startswith(THINK_OPEN):  # the model re-opened the block the prompt opened
            text = text[len(THINK_OPEN) :]
        head, closed, tail = text.partition(THINK_CLOSE)
        reasoning = head.strip("\n")
        return reasoning or None, tail.lstrip("\n") if closed else ""

    def parse(self, text: str) -> tuple[str | None, str]:
        return self.split(text, self.thinking_enabled)

    @property
    def in_reasoning(self) -> bool:
        return self._state in ("start", "reasoning")

    def feed(self, delta: str) -> tuple[str, str]:
        """Streaming: (reasoning delta, content delta)."""
        if self._state == "content":
            return "", delta
        self._buf += delta
        reasoning = ""
        if self._state == "start":
            if THINK_OPEN.startswith(self._buf):
                return "", ""  # could still be a leading <think>
            if self._buf.startswith(THINK_OPEN):
                self._buf = self._buf[len(THINK_OPEN) :]
            self._state = "reasoning"
        if self._state == "reasoning":
            head, closed, tail = self._buf.partition(THINK_CLOSE)
            if closed:
                reasoning = self._reasoning(head, final=True)
                self._buf, self._state = tail, "after"
            else:
                keep = _partial_tag(head, THINK_CLOSE)
                reasoning = self._reasoning(head[: len(head) - keep], final=False)
                self._buf = head[len(head) - keep :]
                return reasoning, ""
        if self._state == "after":  # content starts after the newlines that follow </think>
            self._buf = self._buf.lstrip("\n")
            if not self._buf:
                return reasoning, ""
            self._state = "content"
        content, self._buf = self._buf, ""
        return reasoning, content

    def _reasoning(self, text: str, final: bool) -> str:
        text = self._nl + text
        if not self._started:
            text = text.lstrip("\n")
        body = text.rstrip("\n")
        self._nl = "" if final else text[len(body) :]
        self._started = self._started or bool(body)
        return body

    def finish(self) -> tuple[str, str]:
        """End of output: whatever was held back."""
        buf, self._buf = self._buf, ""
        if self._state in ("start", "reasoning"):
            if self._state == "start" and buf == THINK_OPEN:
                buf = ""
            self._state = "reasoning"
            return self._reasoning(buf, final=True), ""
        return "", ("" if self._state == "after" else buf)


# ---- tool calls -----------------------------------------------------------------------------
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
    for t in _schema_types(schema):
        if t == "string":
            return raw
        if t == "null" and s in ("null", "None"):
            return None
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
            for load in (json.loads, ast.literal_eval):  # the template writes Python str() too
                try:
                    v = load(s)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    continue
                if isinstance(v, want):
                    return v
    try:
        return json.loads(s)
    except ValueError:
        return raw


def parse_call_body(body: str, properties: dict[str, dict[str, Any]] | None = None):
    """The text between <tool_call> and </tool_call> -> (name, arguments) or None if malformed.

    Lenient where the model often slips: a missing </parameter> or </function>. A JSON body
    ({"name": ..., "arguments": {...}}, the Qwen 3 style) is accepted too.
    """
    m = _FUNCTION.search(body)
    if m is None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        return (obj["name"], args) if isinstance(args, dict) else None
    name = m.group(1).strip()
    if not name:
        return None
    schema = (properties or {}).get(name, {})
    rest = body[m.end() :]
    rest = rest[: rest.find("</function>")] if "</function>" in rest else rest
    args: dict[str, Any] = {}
    p = _PARAMETER.search(rest)
    while p is not None:
        nxt = _PARAMETER.search(rest, p.end())
        close = rest.find("</parameter>", p.end())
        end = close if close >= 0 and (nxt is None or close < nxt.start()) else None
        if end is None:
            end = nxt.start() if nxt else len(rest)
        raw = rest[p.end() : end]
        raw = raw[1:] if raw.startswith("\n") else raw  # the format puts the value on its own lines
        raw = raw[:-1] if raw.endswith("\n") else raw
        key = p.group(1).strip()
        args[key] = convert_value(raw, schema.get(key))
        p = nxt
    return name, args


def _tool_call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


class ToolCallParser:
    """Extracts tool calls from text; the rest is content.

    Whitespace that only separates content from a call is dropped (the template writes
    `content\\n\\n<tool_call>...</tool_call>\\n<tool_call>...`): segment text before a call is
    right-stripped, text after a call left-stripped, and text on both sides of calls is joined
    by one newline.
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
        segments, calls, seg, pos = [], [], "", 0
        while True:
            i = text.find(CALL_OPEN, pos)
            j = text.find(CALL_CLOSE, i + len(CALL_OPEN)) if i >= 0 else -1
            if j < 0:
                segments.append(seg + text[pos:])
                break
            parsed = parse_call_body(text[i + len(CALL_OPEN) : j], self.properties)
            if parsed is None:  # malformed: plain text
                seg += text[pos : j + len(CALL_CLOSE)]
            else:
                segments.append(seg + text[pos:i])
                seg = ""
                calls.append(_tool_call(*parsed))
            pos = j + len(CALL_CLOSE)
        last, content = len(segments) - 1, []
        for k, s in enumerate(segments):
            s = s.lstrip() if k > 0 else s  # after a call
            content.append(s.rstrip() if k < last else s)  # before a call
        return "\n".join(s for s in content if s), calls

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """Streaming: (content delta, completed tool calls with their `index`)."""
        self._buf += delta
        out: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                i = self._buf.find(CALL_OPEN)
                if i < 0:
                    keep = _partial_tag(self._buf, CALL_OPEN)
                    out.append(self._text(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                out.append(self._text(self._buf[:i]))
                self._buf, self._in_call = self._buf[i:], True
                self._scan = len(CALL_OPEN)
            j = self._buf.find(CALL_CLOSE, self._scan)
            if j < 0:  # next time, search only where a new </tool_call> could end
                self._scan = max(len(CALL_OPEN), len(self._buf) - len(CALL_CLOSE) + 1)
                break
            raw, self._buf = self._buf[: j + len(CALL_CLOSE)], self._buf[j + len(CALL_CLOSE) :]
            self._in_call = False
            parsed = parse_call_body(raw[len(CALL_OPEN) : j], self.properties)
            if parsed is None:
                out.append(self._text(raw))
            else:
                self._ws, self._after_call = "", True
                calls.append({"index": self.num_calls, **_tool_call(*parsed)})
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
        """End of output: held text and any unclosed call become content."""
        buf, self._buf, self._in_call = self._buf, "", False
        text = self._text(buf) + self._ws
        self._ws = ""
        return text, []


# ---- both, for the chat completions endpoint ------------------------------------------------
class OutputDelta(NamedTuple):
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]


class ChatOutputParser:
    """Reasoning + tool calls for one choice. Tool parsing is on when `tools` is non-empty."""

    def __init__(self, thinking_enabled: bool, tools: list[Any] | None = None) -> None:
        self.thinking_enabled = thinking_enabled
        self.tools = list(tools or [])
        self._reasoning = ReasoningParser(thinking_enabled)
        self._tools_r = ToolCallParser(self.tools) if self.tools else None  # calls inside <think>
        self._tools_c = ToolCallParser(self.tools) if self.tools else None
        self._r_done = False
        self.num_calls = 0

    def feed(self, delta: str) -> OutputDelta:
        return self._route(*self._reasoning.feed(delta), final=False)

    def finish(self) -> OutputDelta:
        return self._route(*self._reasoning.finish(), final=True)

    def _route(self, reasoning: str, content: str, final: bool) -> OutputDelta:
        calls: list[dict[str, Any]] = []
        if self._tools_r is not None and self._tools_c is not None:
            reasoning, calls = self._tools_r.feed(reasoning)
            if not self._r_done and (final or not self._reasoning.in_reasoning):
                self._r_done = True  # the think block closed: flush its held text now
                reasoning += self._tools_r.finish()[0]
            content, more = self._tools_c.feed(content)
            calls += more
            if final:
                content += self._tools_c.finish()[0]
        for call in calls:
            call["index"], self.num_calls = self.num_calls, self.num_calls + 1
        return OutputDelta(reasoning, content, calls)

    def parse_full(self, text: str) -> tuple[str | None, str, list[dict[str, Any]]]:
        """Non-streaming: (reasoning_content or None, content, tool_calls)."""
        reasoning, content = ReasoningParser.split(text, self.thinking_enabled)
        if not self.tools:
            return reasoning, content, []
        calls: list[dict[str, Any]] = []
        if reasoning is not None:
            reasoning, calls = ToolCallParser(self.tools).parse(reasoning)
        content, more = ToolCallParser(self.tools).parse(content)
        return reasoning or None, content, calls + more
