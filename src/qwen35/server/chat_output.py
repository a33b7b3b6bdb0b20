"""One chat choice's model output -> OpenAI message (non-streaming) or deltas (streaming).

ChatOutputParser (server/parsers.py) splits the text into reasoning, content and tool calls;
this module only shapes its results as OpenAI JSON: tool-call ids, argument JSON text, delta
dicts with only the fields present, and finish_reason "tool_calls" when a call was made.
"""

from __future__ import annotations

import json
from typing import Any

from qwen35.server.protocol import ChatResponseMessage, FunctionCall, ToolCall, random_id


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _arguments_text(args: Any) -> str:
    if args is None:
        return ""
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


class ChoiceBuilder:
    def __init__(self, thinking: bool, tools: list[dict[str, Any]] | None):
        from qwen35.server.parsers import ChatOutputParser

        self.parser = ChatOutputParser(thinking_enabled=thinking, tools=tools)
        self._ids: dict[int, str] = {}  # streamed tool-call index -> id
        self.has_tool_calls = False

    # ---- non-streaming -------------------------------------------------------------------
    def message(self, text: str) -> ChatResponseMessage:
        reasoning, content, calls = self.parser.parse_full(text)
        tool_calls = [
            ToolCall(
                id=_get(c, "id") or random_id("call"),
                function=FunctionCall(
                    name=_get(_get(c, "function", c), "name"),
                    arguments=_arguments_text(_get(_get(c, "function", c), "arguments")),
                ),
            )
            for c in calls or []
        ]
        self.has_tool_calls = bool(tool_calls)
        return ChatResponseMessage(
            content=content if content or not tool_calls else None,
            reasoning_content=reasoning or None,
            tool_calls=tool_calls,
        )

    # ---- streaming -----------------------------------------------------------------------
    def feed(self, text: str) -> dict[str, Any]:
        return self._delta(self.parser.feed(text)) if text else {}

    def finish(self) -> dict[str, Any]:
        return self._delta(self.parser.finish())

    def _delta(self, d: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if d is None:
            return out
        reasoning = _get(d, "reasoning_content")
        content = _get(d, "content")
        if reasoning:
            out["reasoning_content"] = reasoning
        if content:
            out["content"] = content
        calls = []
        for c in _get(d, "tool_calls") or []:
            fn = _get(c, "function", c)
            index = _get(c, "index", len(self._ids))
            call: dict[str, Any] = {"index": index}
            if index not in self._ids:
                self._ids[index] = _get(c, "id") or random_id("call")
                call.update(id=self._ids[index], type="function")
            f: dict[str, Any] = {}
            if _get(fn, "name"):
                f["name"] = _get(fn, "name")
            args = _get(fn, "arguments")
            if args is not None:
                f["arguments"] = _arguments_text(args)
            call["function"] = f
            calls.append(call)
        if calls:
            self.has_tool_calls = True
            out["tool_calls"] = calls
        return out

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            if k in out and isinstance(v, str):
                out[k] += v
            elif k in out and isinstance(v, list):
                out[k] = out[k] + v
            else:
                out[k] = v
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.has_tool_calls else reason
