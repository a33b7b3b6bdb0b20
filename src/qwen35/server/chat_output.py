"""One chat choice's model output -> OpenAI message (non-streaming) or deltas (streaming).

ChatOutputParser (server/parsers.py) splits the text into reasoning, content and tool calls;
this module only shapes its results as OpenAI JSON: message and delta dicts with only the
fields present, and finish_reason "tool_calls" when a call was made.
"""

from __future__ import annotations

import json
from typing import Any

from qwen35.server.parsers import ChatOutputParser, OutputDelta
from qwen35.server.protocol import ChatResponseMessage, FunctionCall, ToolCall, random_id


def _arguments_text(args: Any) -> str:
    if args is None:
        return ""
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _tool_call(call: dict[str, Any]) -> ToolCall:
    fn = call.get("function", call)
    return ToolCall(
        id=call.get("id") or random_id("call"),
        function=FunctionCall(name=fn["name"], arguments=_arguments_text(fn.get("arguments"))),
    )


class ChoiceBuilder:
    def __init__(self, thinking: bool, tools: list[dict[str, Any]] | None):
        self.parser = ChatOutputParser(thinking_enabled=thinking, tools=tools)
        self.has_tool_calls = False

    # ---- non-streaming -------------------------------------------------------------------
    def message(self, text: str) -> ChatResponseMessage:
        reasoning, content, calls = self.parser.parse_full(text)
        tool_calls = [_tool_call(c) for c in calls]
        self.has_tool_calls = bool(tool_calls)
        return ChatResponseMessage(
            # OpenAI sends null content with tool calls when there is no text
            content=content if content or not tool_calls else None,
            reasoning_content=reasoning or None,
            tool_calls=tool_calls,
        )

    # ---- streaming -----------------------------------------------------------------------
    def feed(self, text: str) -> dict[str, Any]:
        return self._delta(self.parser.feed(text)) if text else {}

    def finish(self) -> dict[str, Any]:
        return self._delta(self.parser.finish())

    def _delta(self, d: OutputDelta) -> dict[str, Any]:
        """Only the fields present; each tool call arrives whole, in one delta."""
        out: dict[str, Any] = {}
        if d.reasoning:
            out["reasoning_content"] = d.reasoning
        if d.content:
            out["content"] = d.content
        if d.tool_calls:
            self.has_tool_calls = True
            out["tool_calls"] = [
                {"index": c["index"], **_tool_call(c).model_dump()} for c in d.tool_calls
            ]
        return out

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = out[k] + v if k in out else v  # str + str, list + list
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.has_tool_calls else reason
