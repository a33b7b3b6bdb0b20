"""Structured outputs by constrained decoding (llguidance): JSON schema, regex, choice, Lark
grammars and Qwen 3.5 tool calls. See grammar.py (constraints -> grammars), compiler.py
(compiled off the engine loop, cached, with a timeout) and manager.py (per-sequence matchers and
the per-step token mask)."""

from __future__ import annotations

from qwen35.engine.structured.compiler import GrammarCompiler, StructuredOutputError
from qwen35.engine.structured.grammar import grammar_for, tool_call_grammar
from qwen35.engine.structured.manager import StructuredOutputManager, apply_token_bitmask

__all__ = [
    "GrammarCompiler",
    "StructuredOutputError",
    "StructuredOutputManager",
    "apply_token_bitmask",
    "grammar_for",
    "tool_call_grammar",
]
