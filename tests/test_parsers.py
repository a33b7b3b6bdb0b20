"""Reasoning / tool-call output parsers: expected results, and streaming == non-streaming."""

from __future__ import annotations

import json
import random

import pytest

from qwen35.server.parsers import (
    ChatOutputParser,
    ReasoningParser,
    ToolCallParser,
    convert_value,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TYPED = {
    "type": "function",
    "function": {
        "name": "typed",
        "parameters": {
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "x": {"type": "number"},
                "flag": {"type": "boolean"},
                "obj": {"type": "object"},
                "arr": {"type": "array"},
                "s": {"type": "string"},
                "maybe": {"type": ["integer", "null"]},
                "either": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
            },
        },
    },
}
WRITE = {
    "type": "function",
    "function": {
        "name": "write_file",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"},
                "note": {"type": ["string", "null"]},
                "alt": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        },
    },
}
TOOLS = [WEATHER, TYPED, WRITE]


def call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


PARIS, ROME = call("get_weather", city="Paris", days=2), call("get_weather", city="Rome")
SAMPLES = {
    "plain": "Let me think.\nStep 2.\n</think>\n\nThe answer is 42.",
    "reopened-think": "<think>\nhm\n\n</think>\n\nok\n",
    "no-close": "Still thinking when max_tokens hit\n",
    "parallel": f"I should check.\n</think>\n\nLet me look.\n\n{PARIS}\n{ROME}",
    "call-in-think": f"I'll call the tool.\n{PARIS}",
    "call-in-think-then-content": f"Call it.\n{PARIS}\n</think>\n\nDone: {ROME}\nBye.",
    "malformed": "x\n</think>\n\ntext <tool_call>\nhello\n</tool_call> more\n<tool_call>\n<function=>\n</tool_call>",
    "unclosed": f"r</think>\n\ntext\n{PARIS[:-3]}",
    "stray-close": "Answer </think> more <think> and </think>",
    "angles": "a < b <tool and <tool_cal </thi </think>\n\n<<tool_call>x</tool_call>",
    "unicode": "思考 😀\n</think>\n\n答案是 42 👍🏽",
    "typed": "</think>\n\n" + call("typed", n="5", x="2.5", flag="True", obj='{"a": [1]}',
                               arr="[1, 2]", s="0042", maybe="null", either="false"),
    "json-call": '</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "missing-closers": "</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n<parameter=days>\n3\n</tool_call>",
    # issue 11: values that hold tag-like text (a coding agent writing code or this format)
    "tag-values": "</think>\n\nWriting.\n\n" + call("write_file", path="a.py", content=(
        "print('</tool_call>')\nx = '</parameter>'\n</function>\n<parameter=path>\ny\n"
        "<parameter=mode>\n</parameter>\n<parameter=path>\nz")) + "\n" + ROME,
    "tag-values-json": '</think>\n\n<tool_call>\n{"name": "write_file", "arguments": '
                       '{"content": "print(\'</tool_call>\')"}}\n</tool_call>',
    "nullable": "</think>\n\n" + call("write_file", path="p", note="None", alt="null"),
    "lenient-then-text": "</think>\n\n<tool_call>\n<function=get_weather>\n"
                         "<parameter=city>\nLima\n</tool_call>\nmore text",
    "truncated-in-value": "</think>\n\n" + call("write_file", content="a </tool_call> b")[:60],
}  # fmt: skip


def _stream(parser: ChatOutputParser, chunks: list[str]):
    r, c, calls = [], [], []
    for ch in chunks:
        d = parser.feed(ch)
        r.append(d.reasoning)
        c.append(d.content)
        calls += d.tool_calls
    d = parser.finish()
    r.append(d.reasoning)
    c.append(d.content)
    calls += d.tool_calls
    return "".join(r), "".join(c), calls


def _strip_ids(calls):
    return [{k: v for k, v in c.items() if k not in ("id", "index")} for c in calls]


def _chunkings(text: str, seed: int):
    rng = random.Random(seed)
    yield list(text)
    yield [text]
    for _ in range(3):
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            chunks.append(text[i : i + n])
            i += n
        yield chunks


CONFIGS = [(True, TOOLS), (False, TOOLS), (True, None), (False, None)]


@pytest.mark.parametrize("name", list(SAMPLES))
@pytest.mark.parametrize("thinking,tools", CONFIGS, ids=["on-tools", "off-tools", "on", "off"])
def test_streaming_equals_full(name, thinking, tools):
    text = SAMPLES[name]
    reasoning, content, calls = ChatOutputParser(thinking, tools).parse_full(text)
    expected = (reasoning or "", content, _strip_ids(calls))
    for chunks in _chunkings(text, seed=len(name)):
        r, c, got = _stream(ChatOutputParser(thinking, tools), chunks)
        assert (r, c, _strip_ids(got)) == expected, chunks
        assert [g["index"] for g in got] == list(range(len(got)))


@pytest.mark.parametrize(
    "name",
    ["parallel", "call-in-think-then-content", "malformed", "typed", "tag-values",
     "lenient-then-text", "missing-closers"],
)  # fmt: skip
def test_every_split_point(name):
    text = SAMPLES[name]
    full = ChatOutputParser(True, TOOLS).parse_full(text)
    expected = (full[0] or "", full[1], _strip_ids(full[2]))
    for k in range(len(text) + 1):
        r, c, got = _stream(ChatOutputParser(True, TOOLS), [text[:k], text[k:]])
        assert (r, c, _strip_ids(got)) == expected, k


def _fn(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_expected_results():
    p = ChatOutputParser(True, TOOLS)
    assert p.parse_full(SAMPLES["plain"]) == ("Let me think.\nStep 2.", "The answer is 42.", [])
    assert p.parse_full(SAMPLES["reopened-think"]) == ("hm", "ok\n", [])
    assert p.parse_full(SAMPLES["no-close"]) == ("Still thinking when max_tokens hit", "", [])
    r, c, calls = p.parse_full(SAMPLES["parallel"])
    assert (r, c) == ("I should check.", "Let me look.")
    assert _fn(calls) == [("get_weather", {"city": "Paris", "days": 2}),
                          ("get_weather", {"city": "Rome"})]  # fmt: skip
    assert all(x["type"] == "function" and x["id"].startswith("call_") for x in calls)
    assert calls[0]["id"] != calls[1]["id"] and len(calls[0]["id"]) == len("call_") + 24


def test_tool_call_inside_think_is_extracted():
    # peers.md §4 #7: the call sits inside the reasoning and the think block never closes.
    r, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["call-in-think"])
    assert (r, c) == ("I'll call the tool.", "")
    assert _fn(calls) == [("get_weather", {"city": "Paris", "days": 2})]
    r, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["call-in-think-then-content"])
    assert (r, c) == ("Call it.", "Done:\nBye.")
    assert [n for n, _ in _fn(calls)] == ["get_weather", "get_weather"]


def test_malformed_calls_are_content():
    r, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["malformed"])
    assert calls == []
    assert c == "text <tool_call>\nhello\n</tool_call> more\n<tool_call>\n<function=>\n</tool_call>"
    r, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["unclosed"])
    assert calls == [] and c == "text\n" + PARIS[:-3]
    assert ToolCallParser().parse("<tool_call>{not json}</tool_call>") == (
        "<tool_call>{not json}</tool_call>",
        [],
    )


def test_lenient_call_forms():
    _, _, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["json-call"])
    assert _fn(calls) == [("get_weather", {"city": "Oslo"})]
    _, _, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["missing-closers"])
    assert _fn(calls) == [("get_weather", {"city": "Lima", "days": 3})]


def test_schema_typed_arguments():
    _, _, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["typed"])
    assert _fn(calls) == [
        (
            "typed",
            {"n": 5, "x": 2.5, "flag": True, "obj": {"a": [1]}, "arr": [1, 2], "s": "0042",
             "maybe": None, "either": False},
        )
    ]  # fmt: skip


@pytest.mark.parametrize(
    "raw,schema,expected",
    [
        ("7", {"type": "integer"}, 7),
        ("7.0", {"type": "integer"}, 7),
        ("seven", {"type": "integer"}, "seven"),
        ("3", {"type": "number"}, 3),
        ("1e3", {"type": "number"}, 1000.0),
        ("false", {"type": "boolean"}, False),
        ("{'a': None}", {"type": "object"}, {"a": None}),  # Python str() from an old template
        ("[1,", {"type": "array"}, "[1,"),
        ("  spaced  ", {"type": "string"}, "  spaced  "),
        ("42", None, 42),
        ("null", None, None),
        ('{"k": "v"}', {}, {"k": "v"}),
        ("Paris", None, "Paris"),
        ("nan", {"type": "number"}, "nan"),
        ("NaN", None, "NaN"),
        ("[1, Infinity]", {"type": "array"}, "[1, Infinity]"),
        ("[{1, 2}]", {"type": "array"}, "[{1, 2}]"),  # a Python set: not JSON
        ("{'a': b'x'}", {"type": "object"}, "{'a': b'x'}"),
    ],
)
def test_convert_value(raw, schema, expected):
    assert convert_value(raw, schema) == expected


def test_thinking_off_everything_is_content_at_once():
    # peers.md §4 #8: with thinking off, deltas must flow as content immediately.
    p = ChatOutputParser(False, None)
    assert p.feed("Hello") == ("", "Hello", [])
    assert p.feed(" </think> x") == ("", " </think> x", [])
    assert ReasoningParser(False).parse("a </think> b") == (None, "a </think> b")


def test_streaming_holds_only_tag_prefixes():
    rp = ReasoningParser(True)
    assert rp.feed("abc") == ("abc", "")
    assert rp.feed(" </thi") == (" ", "")
    assert rp.feed("nk>\n") == ("", "")
    assert rp.feed("\nX") == ("", "X")
    tp = ToolCallParser(TOOLS)
    assert tp.feed("Hi <tool") == ("Hi", [])  # " " waits: it disappears if a call follows
    assert tp.feed("bar") == (" <toolbar", [])
    content, calls = tp.feed(" " + PARIS)
    assert content == "" and len(calls) == 1 and calls[0]["index"] == 0
    assert tp.finish() == ("", [])


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_never_raises_and_stays_consistent(seed):
    rng = random.Random(seed)
    pieces = ["<tool_call>", "</tool_call>", "<function=get_weather>", "<function=", ">",
              "<parameter=city>", "</parameter>", "</function>", "<think>", "</think>", "\n",
              "Paris", " ", "{", '"name"', "<", "/", "2", "<function=write_file>",
              "<parameter=content>", "<parameter=path>", "</parameter>\n</function>"]  # fmt: skip
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
    for thinking in (True, False):
        full = ChatOutputParser(thinking, TOOLS).parse_full(text)
        expected = (full[0] or "", full[1], _strip_ids(full[2]))
        for chunks in _chunkings(text, seed):
            r, c, got = _stream(ChatOutputParser(thinking, TOOLS), chunks)
            assert (r, c, _strip_ids(got)) == expected


# ---- issue 11: tag-like text inside values, nullable strings ---------------------------------


def test_values_with_tag_like_text_stay_whole():
    r, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["tag-values"])
    content = (
        "print('</tool_call>')\nx = '</parameter>'\n</function>\n<parameter=path>\ny\n"
        "<parameter=mode>\n</parameter>\n<parameter=path>\nz"
    )
    assert c == "Writing."
    assert _fn(calls) == [
        ("write_file", {"path": "a.py", "content": content}),
        ("get_weather", {"city": "Rome"}),
    ]
    _, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["tag-values-json"])
    assert c == "" and _fn(calls) == [("write_file", {"content": "print('</tool_call>')"})]
    # the issue's example, thinking off
    text = call("write_file", path="x.py", content="print('</tool_call>')")
    assert _fn(ToolCallParser(TOOLS).parse(text)[1]) == [
        ("write_file", {"path": "x.py", "content": "print('</tool_call>')"})
    ]


@pytest.mark.parametrize(
    "value",
    ["</tool_call>", "</parameter>", "</function>", "<parameter=path>", "<parameter=content>",
     "</parameter>\n<parameter=content>\nq", "a\n</function>\n</tool_call>\nb", "<tool_call>"],
)  # fmt: skip
def test_any_single_tag_in_a_value_round_trips(value):
    # (A value holding the whole closing sequence `\n</parameter>\n</function>\n</tool_call>`
    # is ambiguous in this format: it ends the call there.)
    # what the chat template writes for {"path": "p", "content": value}, then more content
    text = call("write_file", path="p", content=value) + "\nand after"
    for chunks in _chunkings(text, seed=len(value)):
        r, c, calls = _stream(ChatOutputParser(False, TOOLS), chunks)
        assert _fn(calls) == [("write_file", {"path": "p", "content": value})], chunks
        assert c == "and after"


def test_unknown_or_repeated_parameter_tags_are_value_text():
    # no </parameter> at all: a new line `<parameter=KEY>` starts a parameter only for a key
    # of the tool that is not given yet
    text = ("<tool_call>\n<function=write_file>\n<parameter=content>\na\n<parameter=nope>\nb\n"
            "<parameter=content>\nc\n<parameter=path>\nd\n</function>\n</tool_call>")  # fmt: skip
    assert _fn(ToolCallParser(TOOLS).parse(text)[1]) == [
        ("write_file", {"content": "a\n<parameter=nope>\nb\n<parameter=content>\nc", "path": "d"})
    ]


def test_lenient_calls_need_the_end_of_output():
    _, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["lenient-then-text"])
    assert calls == [] and c.startswith("<tool_call>") and c.endswith("more text")
    _, c, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["truncated-in-value"])
    assert calls == [] and c == SAMPLES["truncated-in-value"][len("</think>\n\n") :]


def test_nullable_string_none_is_json_null():
    _, _, calls = ChatOutputParser(True, TOOLS).parse_full(SAMPLES["nullable"])
    assert _fn(calls) == [("write_file", {"path": "p", "note": None, "alt": None})]
    assert convert_value("None", {"type": ["string", "null"]}) is None
    assert convert_value("none at all", {"type": ["string", "null"]}) == "none at all"
    assert convert_value("None", {"type": "string"}) == "None"  # not nullable: a string


def test_deeply_nested_values_do_not_raise():
    deep = "[" * 100_000 + "]" * 100_000
    assert convert_value(deep, {"type": "array"}) == deep
    assert convert_value(deep) == deep
    text = f'<tool_call>\n{{"name": "f", "arguments": {deep}}}\n</tool_call>'
    assert ToolCallParser(TOOLS).parse(text)[1] == []
