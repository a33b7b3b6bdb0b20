"""Constraints -> llguidance grammars (text), including Qwen 3.5's tool-call format.

- `grammar_for(spec)`: a `StructuredOutputs` as llguidance's grammar text. JSON schemas compile
  with compact separators (`{"a":1}`) unless `whitespace_pattern` allows more, and objects with
  `properties` are closed unless they say otherwise (`close_objects`); a choice is a
  Lark alternation of literals; a regex and a Lark grammar pass through.
- `tool_call_grammar(tools, ...)`: Lark for one or more calls in Qwen 3.5's XML format
  (`<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>`),
  values shaped so `server/parsers.py` reads back arguments valid against the tool's schema:
  strings are raw text (enum: one of the literals, pattern: that regex, maxLength: bounded),
  everything else is JSON (`%json` with the property's schema), as the chat template writes them.
  Required parameters come first in schema order, then optional ones, each optional.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from qwen35.request import StructuredOutputs

# Raw-text string values: anything but '<' (which could open "</parameter>") or a newline (the
# value's end is the "\n</parameter>" that follows; a lexeme that may hold "\n" would swallow it).
_RAW_TEXT = "[^<\\n]"


def close_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists `properties` and
    says nothing about others (xgrammar's strict mode, vLLM's default): otherwise a weak model
    may add keys of its own invention until max_tokens."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}  # fmt: skip
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: close_objects(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def json_options(spec: StructuredOutputs) -> dict[str, Any]:
    if spec.whitespace_pattern is None:
        return {"whitespace_flexible": False}
    return {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}


def grammar_for(spec: StructuredOutputs) -> str:
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else {"type": "object"}
        if isinstance(schema, str):
            schema = json.loads(schema)
        return llguidance.LLMatcher.grammar_from_json_schema(
            close_objects(schema), defaults=json_options(spec)
        )
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alts = " | ".join(_lark_str(c) for c in spec.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alts}\n")
    assert spec.grammar is not None
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


def _lark_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a double-quoted literal Lark reads back as s


def _is_raw_string(schema: dict[str, Any]) -> bool:
    """Values the parser returns as raw text: a schema whose type is exactly "string"."""
    t = schema.get("type")
    return t == "string" or (t is None and "enum" in schema and all(
        isinstance(v, str) for v in schema["enum"]
    ))  # fmt: skip


def _string_value(schema: dict[str, Any]) -> str:
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return "(" + " | ".join(_lark_str(v) for v in values if isinstance(v, str)) + ")"
    if "pattern" in schema:
        pat = schema["pattern"].removeprefix("^").removesuffix("$")
        return f"/{llguidance.regex_to_lark(pat, 'dw')}/"
    lo = int(schema.get("minLength", 0))
    hi = schema.get("maxLength")
    return f"/{_RAW_TEXT}{{{lo},{'' if hi is None else int(hi)}}}/"


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    # no free whitespace: a trailing newline inside the JSON lexeme would swallow the "\n" of
    # "\n</parameter>" that must follow
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _function_rule(name: str, params: dict[str, Any], prefix: str) -> tuple[str, list[str]]:
    """(the body rule, extra rules) for one function; `prefix` keeps rule names unique."""
    props = params.get("properties") or {}
    if not isinstance(props, dict):
        raise ValueError(f"{name}: parameters.properties must be an object")
    required = [k for k in params.get("required") or [] if isinstance(k, str) and k in props]
    order = required + [k for k in props if k not in required]
    parts, rules = [], []
    for i, key in enumerate(order):
        schema = props[key] if isinstance(props[key], dict) else {}
        value = (
            _string_value(schema)
            if _is_raw_string(schema)
            else "%json " + json.dumps(_compact(close_objects(schema)), ensure_ascii=False)
        )
        rule = f"{prefix}_p{i}"
        head = _lark_str(f"<parameter={key}>\n")
        rules.append(f"{rule}: {head} {value} " + _lark_str("\n</parameter>\n"))
        parts.append(rule if key in required else f"{rule}?")
    body = " ".join([_lark_str(f"<function={name}>\n"), *parts, _lark_str("</function>\n")])
    return body, rules


def tool_call_grammar(
    tools: list[dict[str, Any]],
    *,
    multiple: bool,
    call_open_id: int | None,
    call_close_id: int | None,
) -> str:
    """Lark text (for `StructuredOutputs(grammar=...)`) for one call to any of `tools` (OpenAI tool dicts), or several when `multiple`.
    The <tool_call> tags are their single added tokens where the vocabulary has them."""
    open_ = f"<[{call_open_id}]>" if call_open_id is not None else _lark_str("<tool_call>")
    close = f"<[{call_close_id}]>" if call_close_id is not None else _lark_str("</tool_call>")
    alts, rules = [], []
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool)
        params = fn.get("parameters") or {}
        body, extra = _function_rule(
            fn["name"], params if isinstance(params, dict) else {}, f"f{j}"
        )
        rules.append(f"fn{j}: {body}")
        rules.extend(extra)
        alts.append(f"fn{j}")
    call = f'call: {open_} "\\n" ({" | ".join(alts)}) {close}'
    start = 'start: call ("\\n" call)*' if multiple else "start: call"
    return "\n".join([start, call, *rules]) + "\n"
