"""Reasoning and tool-call parsing of Qwen 3.5 chat output, whole or streamed.

- `ReasoningParser`: with thinking on, the prompt ends inside `<think>\\n`, so the output is
  `reasoning\\n</think>\\n\\ncontent`; with thinking off everything is content, at once (vLLM's
  streaming parser waited for a `</think>` that never came: peers.md §4 #8).
- `ToolCallParser` (tool_calls.py): Qwen 3.5's XML calls, `<tool_call>\n<function=NAME>\n
  <parameter=K>\nV\n</parameter>\n</function>\n</tool_call>`, into OpenAI tool calls, values
  typed by the tool's JSON schema (a nullable parameter's `None` / `null` is JSON null). A value
  may hold any text, tags included: a closing tag counts only where what follows continues the
  call. Malformed or unclosed calls stay text; nothing here raises on model output.
- `ChatOutputParser`: both, with calls extracted from the reasoning too (a call the model writes
  inside `<think>` is still a call: peers.md §4 #7).

Streaming holds back only what may be the start of a tag (`</think>`, `<tool_call>`), a call
until its end is certain, and whitespace whose fate depends on what follows, so the
concatenated deltas always equal the non-streaming parse of the whole text, however the text
was split (the tool-call parser's non-streaming parse is its streaming one, fed at once).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from qwen35.server.tool_calls import (  # noqa: F401  (re-exported)
    ToolCallParser,
    _partial_tag,
    convert_value,
    parse_call_body,
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
                text, more = self._tools_r.finish()
                reasoning, calls = reasoning + text, calls + more
            content, more = self._tools_c.feed(content)
            calls += more
            if final:
                text, more = self._tools_c.finish()
                content, calls = content + text, calls + more
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
