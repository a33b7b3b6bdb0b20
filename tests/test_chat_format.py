"""The Qwen 3.5 chat format: exact renderings from the spec, jinja path == built-in renderer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen35.chat_format import (
    ChatFormatError,
    ChatTemplate,
    check_text_only,
    default_thinking_for,
    media_parts,
    normalize_messages,
    prompt_thinking_enabled,
)

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_5_chat_template.jinja"
TEMPLATE = FIXTURE.read_text()
# The 0.8B / 2B file differs in one place: thinking only when enable_thinking is true.
LARGE_TAIL = """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}"""
SMALL_TAIL = """    {%- if enable_thinking is defined and enable_thinking is true %}
        {{- '<think>\\n' }}
    {%- else %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}"""
assert LARGE_TAIL in TEMPLATE
TEMPLATE_SMALL = TEMPLATE.replace(LARGE_TAIL, SMALL_TAIL)

FIXED_BLOCK = """

If you choose to call a function ONLY reply in the following format with NO suffix:

<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
<parameter=example_parameter_2>
This is the value for the second parameter
that can span
multiple lines
</parameter>
</function>
</tool_call>

<IMPORTANT>
Reminder:
- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags
- Required parameters MUST be specified
- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after
- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls
</IMPORTANT>"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
WEATHER_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the current '
    'weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": '
    '"string", "description": "City name"}, "days": {"type": "integer"}}, "required": ["city"]}}}'
)
SYSTEM_TOOLS = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    + WEATHER_JSON
    + "\n</tools>"
    + FIXED_BLOCK
    + "\n\nYou are a weather bot.<|im_end|>\n"
)
CALLS = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)
RESULTS = (
    '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
    '<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n'
)
OPEN, CLOSED = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"

PLAIN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi!"},
]
PLAIN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
)


def _call(city, args_as_string=False):
    args = {"city": city, "days": 2}
    return {
        "id": f"call_{city}",
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": json.dumps(args) if args_as_string else args,
        },
    }


def weather_messages(args_as_string=False, continued=False):
    msgs = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Rome for 2 days?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need two calls.",
            "tool_calls": [_call("Paris", args_as_string), _call("Rome", args_as_string)],
        },
        {"role": "tool", "tool_call_id": "call_Paris", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_Rome", "content": '{"temp": 25}'},
    ]
    if continued:
        msgs += [
            {"role": "assistant", "content": "Paris 21C, Rome 25C."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome!"},
        ]
    return msgs


VISION = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "file:///tmp/a.png"},
            {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
            {"type": "video", "video": "file:///tmp/c.mp4"},
            {"type": "text", "text": "Describe these."},
        ],
    }
]

# (name, messages, tools, kwargs, expected) -- the exact renderings of chat-format.md
CASES = [
    ("A-default", PLAIN, None, {}, PLAIN_TEXT + OPEN),
    ("A-off", PLAIN, None, {"enable_thinking": False}, PLAIN_TEXT + CLOSED),
    ("A-on", PLAIN, None, {"enable_thinking": True}, PLAIN_TEXT + OPEN),
    ("A-string-false-ignored", PLAIN, None, {"enable_thinking": "false"}, PLAIN_TEXT + OPEN),
    ("A-no-gen", PLAIN, None, {"add_generation_prompt": False}, PLAIN_TEXT),
    (
        "B",
        weather_messages(),
        [WEATHER],
        {},
        SYSTEM_TOOLS
        + "<|im_start|>user\nWeather in Paris and Rome for 2 days?<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nNeed two calls.\n</think>\n\n"
        + CALLS
        + "<|im_end|>\n"
        + RESULTS
        + OPEN,
    ),
    (
        "B-continued",
        weather_messages(continued=True),
        [WEATHER],
        {"add_generation_prompt": False},
        SYSTEM_TOOLS
        + "<|im_start|>user\nWeather in Paris and Rome for 2 days?<|im_end|>\n"
        + "<|im_start|>assistant\n"
        + CALLS
        + "<|im_end|>\n"
        + RESULTS
        + "<|im_start|>assistant\nParis 21C, Rome 25C.<|im_end|>\n"
        + "<|im_start|>user\nThanks<|im_end|>\n"
        + CLOSED
        + "You're welcome!<|im_end|>\n",
    ),
    (
        "C",
        VISION,
        None,
        {},
        f"<|im_start|>user\n{IMG}{IMG}{VID}Describe these.<|im_end|>\n" + OPEN,
    ),
    (
        "C-vision-id",
        VISION,
        None,
        {"add_vision_id": True},
        f"<|im_start|>user\nPicture 1: {IMG}Picture 2: {IMG}Video 1: {VID}Describe these."
        "<|im_end|>\n" + OPEN,
    ),
]


def _builtin(default_thinking=None):
    return ChatTemplate.from_model_dir(None, default_thinking)


def _render(tpl: ChatTemplate, messages, tools, kwargs):
    return tpl.render(messages, tools=tools, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_renderings_builtin(case):
    _, msgs, tools, kwargs, expected = case
    assert _render(_builtin(), msgs, tools, kwargs) == expected


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_renderings_jinja(case):
    _, msgs, tools, kwargs, expected = case
    assert _render(ChatTemplate(TEMPLATE), msgs, tools, kwargs) == expected


@pytest.mark.parametrize("make", [_builtin, lambda d: ChatTemplate(TEMPLATE_SMALL, d)])
def test_small_model_variant(make):
    tpl = make(False)
    assert tpl.render(PLAIN) == PLAIN_TEXT + CLOSED
    assert tpl.render(PLAIN, enable_thinking=True) == PLAIN_TEXT + OPEN
    assert tpl.render(PLAIN, enable_thinking="true") == PLAIN_TEXT + CLOSED  # not a real bool


def test_small_template_own_default_without_caller_default():
    assert ChatTemplate(TEMPLATE_SMALL).render(PLAIN) == PLAIN_TEXT + CLOSED
    assert ChatTemplate(TEMPLATE_SMALL).render(PLAIN, enable_thinking=True) == PLAIN_TEXT + OPEN


def test_openai_string_arguments_render_like_dicts():
    as_dict = _builtin().render(weather_messages(), tools=[WEATHER])
    for tpl in (_builtin(), ChatTemplate(TEMPLATE)):
        assert tpl.render(weather_messages(args_as_string=True), tools=[WEATHER]) == as_dict


def test_normalize_messages():
    msgs = weather_messages(args_as_string=True)
    out = normalize_messages(msgs)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}
    assert isinstance(msgs[2]["tool_calls"][0]["function"]["arguments"], str)  # input untouched
    out = normalize_messages([{"role": "assistant", "reasoning": "r", "content": "c"}])
    assert out[0]["reasoning_content"] == "r"
    both = {"role": "assistant", "reasoning": "r", "thinking": "t", "content": "c"}
    assert normalize_messages([both])[0]["reasoning_content"] == "t"  # transformers' order
    both["reasoning_content"] = "rc"
    assert normalize_messages([both])[0]["reasoning_content"] == "rc"
    empty = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": ""}}]}]
    assert normalize_messages(empty)[0]["tool_calls"][0]["function"]["arguments"] == {}
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]
    with pytest.raises(ChatFormatError, match="message 0: .* not valid JSON") as e:
        normalize_messages(bad)
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"
    bad[0]["tool_calls"][0]["function"]["arguments"] = "[" * 100_000
    with pytest.raises(ChatFormatError, match="nested too deeply"):
        normalize_messages(bad)
    with pytest.raises(ChatFormatError, match="must be a JSON object"):
        normalize_messages(
            [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1]"}]}]
        )


# ---- more behaviours, each checked on both paths (and the small variant) ---------------------
def _args_message(args):
    return [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"name": "f", "arguments": args}],
        },
    ]


EXTRA = [
    # Python str() for scalars, tojson (key order, no escaping, non-ASCII kept) for dict/list
    ("scalars", _args_message({"b": True, "n": None, "x": 2.5, "s": "a<b>&'c'"}), None, {}),
    ("nested", _args_message({"z": {"k": "é<>", "a": [1, {"y": None}]}, "l": ["x", 2]}), None, {}),
    ("think-in-content", [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nold answer"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nnew thoughts\n</think>\n\nnew answer"},
    ], None, {"add_generation_prompt": False}),
    ("tool-first", [
        {"role": "tool", "content": "r0"},
        {"role": "user", "content": "q"},
    ], None, {}),
    ("tool-response-only-user-skipped", [
        {"role": "user", "content": "real"},
        {"role": "assistant", "content": "a", "reasoning_content": " r "},
        {"role": "user", "content": "<tool_response>\nx\n</tool_response>"},
        {"role": "assistant", "content": "b", "reasoning_content": "s"},
    ], None, {}),
    ("vision-count-across-turns", [
        {"role": "user", "content": [{"image": "a"}, {"text": "one"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "image"}, {"video": "v"}, {"type": "video"}]},
    ], None, {"add_vision_id": True}),
    ("tools-empty-system", [{"role": "system", "content": "  "}, {"role": "user", "content": "u"}],
     [WEATHER, {"type": "function", "function": {"name": "f"}}], {}),
    ("tools-no-system", [{"role": "user", "content": [{"type": "text", "text": " hi "}]}],
     [WEATHER], {}),
    ("content-none-and-trim", [{"role": "system", "content": None},
                               {"role": "user", "content": "\n  x  \n"}], None, {}),
]  # fmt: skip


@pytest.mark.parametrize("case", EXTRA, ids=[c[0] for c in EXTRA])
@pytest.mark.parametrize("small", [False, True])
def test_jinja_equals_builtin(case, small):
    _, msgs, tools, kwargs = case
    jinja = ChatTemplate(TEMPLATE_SMALL if small else TEMPLATE)
    builtin = _builtin(default_thinking=not small)
    for think in (None, True, False):
        kw = dict(kwargs, enable_thinking=think)
        assert _render(builtin, msgs, tools, kw) == _render(jinja, msgs, tools, kw)


def test_extra_cases_spot_checks():
    b = _builtin()
    out = b.render(EXTRA[0][1], add_generation_prompt=False)
    assert out.endswith(
        "Let me check.\n\n<tool_call>\n<function=f>\n<parameter=b>\nTrue\n</parameter>\n"
        "<parameter=n>\nNone\n</parameter>\n<parameter=x>\n2.5\n</parameter>\n"
        "<parameter=s>\na<b>&'c'\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    )
    out = b.render(EXTRA[1][1], add_generation_prompt=False)
    assert '<parameter=z>\n{"k": "é<>", "a": [1, {"y": null}]}\n</parameter>' in out
    out = b.render(EXTRA[2][1], add_generation_prompt=False)
    assert "<|im_start|>assistant\nold answer<|im_end|>" in out
    assert out.endswith(
        "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\nnew answer<|im_end|>\n"
    )
    assert b.render(EXTRA[3][1]).startswith("\n<tool_response>\nr0\n</tool_response><|im_end|>\n")
    out = b.render(EXTRA[4][1])
    # the tool-response-only user turn is not a query: both turns follow the last real one
    assert "<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>" in out
    assert "<|im_start|>assistant\n<think>\ns\n</think>\n\nb<|im_end|>" in out
    out = b.render(EXTRA[5][1], add_vision_id=True)
    assert f"Picture 2: {IMG}Video 1: {VID}Video 2: {VID}" in out
    out = b.render(EXTRA[6][1], tools=EXTRA[6][2])
    assert out.startswith("<|im_start|>system\n# Tools") and "</IMPORTANT><|im_end|>\n" in out


ERRORS = [
    ([], "No messages provided."),
    ([{"role": "system", "content": "s"}], "No user query found in messages."),
    ([{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}],
     "No user query found in messages."),
    ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
     "System message must be at the beginning."),
    ([{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}],
     "Unexpected message role."),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}],
     "Unexpected item type in content."),
    ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "u"}],
     "System message cannot contain images."),
    ([{"role": "user", "content": 3}], "Unexpected content type."),
]  # fmt: skip


@pytest.mark.parametrize("msgs,message", ERRORS)
def test_errors_same_on_both_paths(msgs, message):
    for tpl in (_builtin(), ChatTemplate(TEMPLATE)):
        with pytest.raises(ChatFormatError) as e:
            tpl.render(msgs)
        assert str(e.value) == message


# ---- the jinja environment matches transformers' -------------------------------------------
@pytest.mark.parametrize("case", CASES + [(*c[:4], None) for c in EXTRA], ids=lambda c: c[0])
def test_jinja_path_equals_transformers(case):
    from transformers.utils.chat_template_utils import render_jinja_template

    _, msgs, tools, kwargs, _ = case
    kwargs = dict(kwargs)
    gen = kwargs.pop("add_generation_prompt", True)
    ours = ChatTemplate(TEMPLATE).render(msgs, tools=tools, add_generation_prompt=gen, **kwargs)
    theirs, _ = render_jinja_template(
        [normalize_messages(msgs)], tools=tools, chat_template=TEMPLATE,
        add_generation_prompt=gen, **kwargs,
    )  # fmt: skip
    assert ours == theirs[0]


def test_jinja_builtin_tojson_would_differ():
    # Why we override the filter: jinja2's own tojson sorts keys and escapes HTML characters.
    from jinja2 import Environment

    jinja_own = Environment().from_string("{{ x | tojson }}").render(x={"b": "<", "a": 1})
    assert jinja_own != ChatTemplate("{{ x | tojson }}").render(
        [{"role": "user", "content": "u"}], x={"b": "<", "a": 1}
    )
    assert ChatTemplate("{{ x | tojson }}").render(PLAIN, x={"b": "<", "a": 1}) == (
        '{"b": "<", "a": 1}'
    )


# ---- loading from a model directory ---------------------------------------------------------
def test_from_model_dir_sources(tmp_path):
    assert ChatTemplate.from_model_dir(tmp_path).is_builtin
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "cfg {{ eos_token }}", "eos_token": "<|im_end|>"})
    )
    assert ChatTemplate.from_model_dir(tmp_path).render(PLAIN) == "cfg <|im_end|>"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert ChatTemplate.from_model_dir(tmp_path).render(PLAIN) == "json"
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    tpl = ChatTemplate.from_model_dir(tmp_path, default_thinking=False)
    assert tpl.render(PLAIN) == PLAIN_TEXT + OPEN  # the template's own default stands
    assert tpl.thinking_default() is True
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE_SMALL)  # an "instruct" repack
    tpl = ChatTemplate.from_model_dir(tmp_path, default_thinking=True)
    assert tpl.render(PLAIN) == PLAIN_TEXT + CLOSED and tpl.thinking_default() is False
    assert tpl.render(PLAIN, enable_thinking=True) == PLAIN_TEXT + OPEN
    assert ChatTemplate.from_model_dir(None, default_thinking=False).thinking_default() is False
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ChatFormatError, match="does not compile"):
        ChatTemplate.from_model_dir(tmp_path)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ChatFormatError, match="does not exist"):
        ChatTemplate.from_model_dir(tmp_path / "missing")
    with pytest.raises(ChatFormatError, match="tools must be a list"):
        _builtin().render(PLAIN, tools=WEATHER)
    with pytest.raises(ChatFormatError, match="must be an object"):
        _builtin().render(["hello"])


def test_template_runtime_error_is_chat_format_error():
    with pytest.raises(ChatFormatError, match="chat template failed"):
        ChatTemplate("{{ messages[0].content | items | list }}").render(PLAIN)


# ---- thinking defaults ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,expected",
    [("Qwen3.5-0.8B", False), ("Qwen/Qwen3.5-2B", False), ("qwen3.5-4b", True),
     ("Qwen3.5-9B-FP8", True), ("Qwen3.5-35B-A3B", True), ("Qwen3.5-397B-A17B", True),
     ("my-model", True)],
)  # fmt: skip
def test_default_thinking_by_name(name, expected):
    assert default_thinking_for(name) is expected


def test_default_thinking_by_config(tmp_path):
    from qwen35.catalog import base_model_names, load_model_config, load_raw

    for name in base_model_names():
        expected = not (name.endswith("0.8B") or name.endswith("2B"))
        assert default_thinking_for(load_model_config(name)) is expected, name
        assert default_thinking_for(load_raw(name)) is expected, name
    (tmp_path / "config.json").write_text(json.dumps(load_raw("Qwen3.5-2B")))
    assert default_thinking_for(tmp_path) is False


def test_prompt_thinking_enabled():
    b = _builtin()
    assert prompt_thinking_enabled(b.render(PLAIN))
    assert not prompt_thinking_enabled(b.render(PLAIN, enable_thinking=False))
    assert not prompt_thinking_enabled(b.render(PLAIN, add_generation_prompt=False))


# ---- images and videos need a vision encoder ---------------------------------------------------
def test_media_parts_and_check_text_only():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": "u"}}]},
        {"role": "user", "content": [{"video": "v.mp4"}, {"type": "image", "image": "i"}]},
    ]  # fmt: skip
    assert media_parts(msgs) == [(1, 1, "image"), (2, 0, "video"), (2, 1, "image")]
    with pytest.raises(ChatFormatError, match="without a vision encoder") as e:
        check_text_only(msgs)
    assert e.value.param == "messages[1].content[1]"
    check_text_only([{"role": "user", "content": [{"type": "text", "text": "only text"}]}, *PLAIN])


# ---- continue_final_message (vLLM's and transformers' flag) ----------------------------------
PREFILL = PLAIN + [{"role": "assistant", "content": "Sure, here is "}]
CONTINUE = [
    ("assistant-prefill", PREFILL),
    ("assistant-parts", PLAIN + [{"role": "assistant", "content": [
        {"type": "text", "text": "A "}, {"type": "text", "text": "B\n"}]}]),
    ("parts-ending-in-space", PLAIN + [{"role": "assistant", "content": [
        {"type": "text", "text": "abc\n"}, {"type": "text", "text": "  "},
        {"type": "text", "text": ""}]}]),
    ("user-continued", [{"role": "user", "content": "Tell me about"}]),
    ("after-tool-results", weather_messages() + [{"role": "assistant", "content": "Paris is"}]),
    ("with-reasoning-and-calls", PLAIN + [{"role": "assistant", "content": "Calling.",
                                           "reasoning_content": "r", "tool_calls": [_call("Rome")]}]),
]  # fmt: skip


@pytest.mark.parametrize("case", CONTINUE, ids=[c[0] for c in CONTINUE])
def test_continue_final_message_equals_transformers(case):
    from transformers.utils.chat_template_utils import render_jinja_template

    _, msgs = case
    theirs, _ = render_jinja_template(
        [normalize_messages(msgs)], chat_template=TEMPLATE, add_generation_prompt=False,
        continue_final_message=True,
    )  # fmt: skip
    for tpl in (ChatTemplate(TEMPLATE), _builtin(), _builtin(default_thinking=False)):
        for think in (None, False):
            out = tpl.render(msgs, add_generation_prompt=False, continue_final_message=True,
                             enable_thinking=think)  # fmt: skip
            assert out == theirs[0]
    assert msgs[-1]["content"] == case[1][-1]["content"]  # the caller's messages untouched


def test_continue_final_message_text():
    want = PLAIN_TEXT + "<|im_start|>assistant\n<think>\n\n</think>\n\nSure, here is"
    assert _builtin().render(PREFILL, add_generation_prompt=False,
                             continue_final_message=True) == want  # fmt: skip
    assert not prompt_thinking_enabled(want)
    # a template that keeps the message's trailing space keeps it in the cut too (transformers)
    raw = ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert raw.render(PREFILL, add_generation_prompt=False,
                      continue_final_message=True) == "[You are a helpful assistant.][Hi!][Sure, here is "  # fmt: skip
    # no content: the model continues where the text would start (after the think block)
    for content in (None, "", " \n"):
        empty = PLAIN + [{"role": "assistant", "content": content, "reasoning_content": "plan"}]
        for tpl in (_builtin(), ChatTemplate(TEMPLATE)):
            out = tpl.render(empty, add_generation_prompt=False, continue_final_message=True)
            assert out == PLAIN_TEXT + "<|im_start|>assistant\n<think>\nplan\n</think>\n\n"


@pytest.mark.parametrize("tpl", [None, TEMPLATE], ids=["builtin", "jinja"])
def test_continue_final_message_errors(tpl):
    t = ChatTemplate(tpl) if tpl else _builtin()
    with pytest.raises(ChatFormatError, match="cannot both be true") as e:
        t.render(PREFILL, continue_final_message=True)
    assert e.value.param == "continue_final_message"
    image_only = [{"role": "user", "content": [{"type": "image", "image": "a"}]}]
    with pytest.raises(ChatFormatError, match="no text to continue"):
        t.render(image_only, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ChatFormatError, match="No messages provided"):
        t.render([], add_generation_prompt=False, continue_final_message=True)
    # a template that leaves out the final message's text has no place to continue it from
    first_only = ChatTemplate("{{ messages[0].content }}")
    with pytest.raises(ChatFormatError, match="does not write the final message"):
        first_only.render(PREFILL, add_generation_prompt=False, continue_final_message=True)


@pytest.mark.parametrize("first", ["Hello", "\n\nstarts with newlines", "  spaced", "ünïcode …"])
@pytest.mark.parametrize("turns", [0, 3])
def test_cache_points_equal_encoding_each_shared_text(first, turns):
    """cache_points finds each shared prefix's length from the cheaper side (the prompt's rest
    for a text that is most of it): the same as encoding the text itself, wherever the text's
    end falls against the tokens (a user message that starts with newlines or spaces)."""
    from qwen35.chat_format import cache_points, shared_prefix
    from qwen35.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    template = ChatTemplate.from_model_dir(None, default_thinking=True)
    msgs = [{"role": "system", "content": "Be brief. " * 300}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"{first} {i}"}, {"role": "assistant", "content": "ok"}]
    msgs.append({"role": "user", "content": first})
    for thinking in (True, False):
        prompt = template.render(msgs, enable_thinking=thinking)
        ids = tok.encode(prompt)
        shared = template.shared_prefixes(msgs, enable_thinking=thinking)
        assert len(shared) == 2 and all(prompt.startswith(t) for t in shared)
        want = tuple(sorted({shared_prefix(tok.encode(t), ids) for t in shared}))
        assert cache_points(tok.encode, shared, ids, prompt) == want
