"""The Qwen 3.5 chat format: a checkpoint's jinja template, or a built-in renderer.

`ChatTemplate.from_model_dir(dir)` renders the directory's template (chat_template.jinja,
chat_template.json or tokenizer_config.json) with jinja2 set up exactly as transformers does;
without one it falls back to `render_builtin`, plain Python that writes the same text as the
official Qwen 3.5 templates (the 4B+ file; with default_thinking=False the 0.8B/2B file).

Thinking default by size (`default_thinking_for`): 0.8B and 2B off, 4B and larger on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from qwen35.errors import Qwen35Error
from qwen35.tokenizer import read_json_dict

TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO "
    "suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\n"
    "value_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second "
    "parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n"
    "<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\n- If there is no "
    "function call available, answer the question like normal with your current knowledge and do "
    "not tell the user about function calls\n</IMPORTANT>"
)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
THINK_OPEN = "<think>\n"
THINK_EMPTY = "<think>\n\n</think>\n\n"


class ChatFormatError(Qwen35Error, ValueError):
    """Messages the chat template refuses; the message is the template's own. `param`: the
    request field at fault, where known (e.g. `messages[2].tool_calls[0].function.arguments`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def default_thinking_for(model: Any) -> bool:
    """Whether a model thinks by default: False for 0.8B and 2B, True for 4B and larger.

    Accepts a ModelConfig (dense with hidden_size <= 2048 -> off; the 35B-A3B MoE also has
    hidden 2048 but thinks), a config dict, a model directory, or a name like "Qwen3.5-2B".
    """
    if isinstance(model, (str, Path)) and Path(model, "config.json").is_file():
        model = json.loads(Path(model, "config.json").read_text())
    if isinstance(model, Mapping):
        text = model.get("text_config") or model
        hidden, moe = text.get("hidden_size"), bool(text.get("num_experts"))
    elif hasattr(model, "hidden_size"):
        hidden, moe = model.hidden_size, bool(getattr(model, "num_experts", 0))
    else:
        m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)b(?![a-z])", str(model).lower())
        return m is None or float(m.group(1)) >= 3
    return moe or not (isinstance(hidden, int) and hidden <= 2048)


def prompt_thinking_enabled(prompt: str) -> bool:
    """True when a rendered prompt leaves the model inside an open think block."""
    return prompt.endswith(THINK_OPEN) and not prompt.endswith(THINK_EMPTY)


def _plain(value: Any) -> Any:
    # Pydantic models (the OpenAI SDK's messages) and mappings become plain dicts/lists, copied.
    if callable(getattr(value, "model_dump", None)):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def normalize_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI-style messages -> what the Qwen template expects (a fresh copy).

    Tool-call `arguments` given as a JSON string (OpenAI style) become a dict; the official
    template only accepts a mapping, so malformed JSON there is an error naming the message.
    `thinking`, else `reasoning`, fills a missing `reasoning_content` (transformers' order).
    """
    out = []
    for i, msg in enumerate(_plain(list(messages))):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"message {i} must be an object with a 'role', got {msg!r}")
        if msg.get("reasoning_content") is None:
            alias = next(
                (msg[k] for k in ("thinking", "reasoning") if msg.get(k) is not None), None
            )
            if alias is not None:
                msg["reasoning_content"] = alias
        for j, call in enumerate(msg.get("tool_calls") or []):
            fn = call.get("function", call) if isinstance(call, dict) else None
            if isinstance(fn, dict) and not isinstance(fn.get("arguments", {}), Mapping):
                where = f"messages[{i}].tool_calls[{j}]" + (".function" if fn is not call else "")
                fn["arguments"] = _parse_arguments(fn.get("arguments"), fn.get("name"), i, where)
        out.append(msg)
    return out


def _parse_arguments(args: Any, name: Any, index: int, where: str) -> dict[str, Any]:
    param = where + ".arguments"
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatFormatError(
                f"message {index}: arguments of tool call {name!r} are not valid JSON ({e})", param
            ) from None
        except RecursionError:
            raise ChatFormatError(
                f"message {index}: arguments of tool call {name!r} are nested too deeply",
                param,
                "nested_too_deeply",
            ) from None
    if not isinstance(args, Mapping):
        raise ChatFormatError(
            f"message {index}: arguments of tool call {name!r} must be a JSON object, got "
            f"{type(args).__name__}",
            param,
        )
    return dict(args)


def media_parts(messages: list[Any]) -> list[tuple[int, int, str]]:
    """(message index, part index, "image" | "video") of every image or video content part."""
    found = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                try:
                    kind = _part_kind(part)
                except ChatFormatError:
                    continue  # the renderer reports it
                if kind != "text":
                    found.append((i, j, kind))
    return found


def check_text_only(messages: list[Any]) -> None:
    """Refuse image / video parts: without a vision encoder they would render as placeholder
    tokens the model cannot see (a silently wrong answer)."""
    parts = media_parts(_plain(list(messages)))
    if parts:
        i, j, kind = parts[0]
        raise ChatFormatError(
            f"message {i} has {kind} input (content part {j}), but this model was loaded without "
            f"a vision encoder: only text is supported; remove the {kind} parts",
            f"messages[{i}].content[{j}]",
        )


def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: key order kept, no HTML escaping (jinja2's builtin differs)."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@dataclass
class ChatTemplate:
    """Renders messages to a prompt string. `source` is jinja text, or None for the built-in."""

    source: str | None = None
    default_thinking: bool | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...

    @classmethod
    def from_model_dir(
        cls, path: str | Path | None, default_thinking: bool | None = None,
        override: str | None = None,
    ) -> ChatTemplate:  # fmt: skip
        """The directory's own template, or the built-in renderer with `default_thinking` (a
        checkpoint's own template keeps its own thinking default: an "instruct" repack with a
        thinking-off template stays off). `override`: jinja text used instead of the
        directory's template (`read_template_arg`; the directory still gives special tokens)."""
        source, specials = override, {}
        if path is not None:
            d = Path(path)
            if not d.is_dir():
                raise ChatFormatError(
                    f"model directory {d} does not exist: pass a checkpoint directory"
                )
            cfg = read_json_dict(d / "tokenizer_config.json", ChatFormatError)
            for key, value in cfg.items():
                if key.endswith("_token") and isinstance(value, dict):
                    value = value.get("content")
                if key.endswith("_token") and isinstance(value, str):
                    specials[key] = value
            if source is None:
                source = _find_template(d, cfg)
        if source is not None:
            _compile(source)  # fail now, not on the first request
            default_thinking = None
        return cls(source, default_thinking, specials)

    @classmethod
    def from_source(cls, source: str, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """A template from jinja text (a request's own: vLLM's `chat_template` field), compiled
        now (ChatFormatError if it does not), with its own thinking default."""
        if not isinstance(source, str) or not source.strip():
            raise ChatFormatError("the chat template is empty")
        _compile(source)
        return cls(source, None, dict(special_tokens or {}))

    def thinking_default(self) -> bool | None:
        """Whether a prompt rendered without enable_thinking leaves the model thinking (None if
        a one-message probe does not render)."""
        try:
            probe = self.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except ChatFormatError:
            return None
        return prompt_thinking_enabled(probe)

    @property
    def is_builtin(self) -> bool:
        return self.source is None

    def render(
        self,
        messages: list[Any],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text. `enable_thinking` must be a real bool; anything else means default.

        `continue_final_message` (vLLM's and transformers' flag; needs add_generation_prompt
        False): the text ends inside the last message, right after its text, so the model
        continues it: an assistant reply begun by the client ("prefill"). As transformers does
        it: a marker and a space follow the final message's last text part, and the text is cut
        at the marker; where the template trims the message (Qwen's does), so is its end. What
        the template writes after that text (the end of turn, any tool calls) goes. A final
        message without text (none, empty or blank) continues from where its text would start
        (transformers refuses None and also cuts the template's newline before a blank one;
        on every message with text the two agree: a scratch fuzz of 6,000 renderings)."""
        msgs = normalize_messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ChatFormatError(
                    "continue_final_message and add_generation_prompt cannot both be true: set "
                    "add_generation_prompt to false to continue the final message",
                    "continue_final_message",
                )
            tail = _mark_final(msgs)
            text = self._render(msgs, tools, False, enable_thinking, **template_kwargs)
            if text.count(CONTINUE_MARK) != 1:
                raise ChatFormatError(
                    "continue_final_message: the chat template does not write the final "
                    "message's text once, so there is no place to continue it from",
                    "continue_final_message",
                )
            # (as transformers: a template that trimmed the message also loses its space here;
            # only the message's own trailing whitespace goes, not the template's before it)
            cut = text.index(CONTINUE_MARK)
            if text[cut : cut + len(CONTINUE_MARK) + 1] != CONTINUE_MARK + " ":
                cut -= min(tail, len(text[:cut]) - len(text[:cut].rstrip()))
            return text[:cut]
        return self._render(msgs, tools, add_generation_prompt, enable_thinking, **template_kwargs)

    def head(self, messages: list[Any], tools: list[Any] | None = None,
             enable_thinking: bool | None = None, **template_kwargs: Any) -> str | None:  # fmt: skip
        """What every conversation that starts with these messages' leading system / developer
        messages and these tools starts with: the text up to where the next (user) message's
        own text begins. It is the prefix a chat's requests share (the prefix cache's
        `SamplingParams.cache_points`): the common start of two renderings that differ only in
        that message. None where the template cannot render them."""
        i = 0
        while i < len(messages) and isinstance(messages[i], dict) and (
            messages[i].get("role") in ("system", "developer")
        ):
            i += 1
        try:
            a, b = (
                self.render([*messages[:i], {"role": "user", "content": probe}], tools,
                            add_generation_prompt=False, enable_thinking=enable_thinking,
                            **template_kwargs)  # fmt: skip
                for probe in ("0", "1")
            )
        except Exception:  # noqa: BLE001 - only a hint: a template that cannot say gives none
            return None
        return a[: shared_prefix(a, b)]

    def shared_prefixes(self, messages: list[Any], tools: list[Any] | None = None,
                        enable_thinking: bool | None = None, **template_kwargs: Any) -> list[str]:  # fmt: skip
        """The texts a prompt of these messages (with the generation prompt) shares with the
        requests likely to follow: the system prompt and tools (`head`: every conversation with
        them), and, when the prompt opens the assistant's turn after a user or tool message, the
        conversation before that turn (its next turn's prompt goes on from there, whatever the
        template writes for the reply: a thinking template opens "<think>" here, and renders a
        past reply without it). `SamplingParams.cache_points` are their lengths in tokens."""
        out = [self.head(messages, tools, enable_thinking, **template_kwargs)]
        last = messages[-1] if messages else None
        if isinstance(last, dict) and last.get("role") in ("user", "tool"):
            try:
                out.append(self.render(messages, tools, add_generation_prompt=False,
                                       enable_thinking=enable_thinking, **template_kwargs))  # fmt: skip
            except Exception:  # noqa: BLE001 - only a hint
                pass
        return [t for t in out if t]

    def _render(
        self,
        msgs: list[dict[str, Any]],
        tools: list[Any] | None,
        add_generation_prompt: bool,
        enable_thinking: bool | None,
        **template_kwargs: Any,
    ) -> str:
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise ChatFormatError(
                f"tools must be a list of tool objects, got {type(tools).__name__}"
            )
        tools = _plain(list(tools)) if tools is not None else None
        if not isinstance(enable_thinking, bool):
            enable_thinking = None
        if self.source is None:
            thinking = self.default_thinking if enable_thinking is None else enable_thinking
            return render_builtin(
                msgs,
                tools,
                add_generation_prompt=add_generation_prompt,
                thinking=True if thinking is None else thinking,
                add_vision_id=bool(template_kwargs.get("add_vision_id")),
            )
        if enable_thinking is None:
            enable_thinking = self.default_thinking
        kwargs = {**self.special_tokens, **template_kwargs}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        return render_jinja(self.source, msgs, tools, add_generation_prompt, **kwargs)


# Follows the final message's text under continue_final_message; the rendered text is cut there.
CONTINUE_MARK = "\x00qwen35:continue\x00"


def _mark_final(msgs: list[dict[str, Any]]) -> int:
    """Append CONTINUE_MARK and a space to the final message's text (its last text part) ->
    how many whitespace characters that text ended in."""
    if not msgs:
        raise ChatFormatError("No messages provided.")
    msg = msgs[-1]
    content = msg.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
        msg["content"] = text + CONTINUE_MARK + " "
        return _trailing_space(text)
    if isinstance(content, (list, tuple)):
        texts = [p for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if texts:  # (the parts are written one after another: their text ends the message)
            whole = "".join(p["text"] for p in texts)
            texts[-1]["text"] += CONTINUE_MARK + " "
            return _trailing_space(whole)
    raise ChatFormatError(
        "continue_final_message: the final message has no text to continue (its content has "
        "no text part)",
        "continue_final_message",
    )


def _trailing_space(text: str) -> int:
    # (a text of only whitespace: a template that trims it leaves none of it before the mark)
    return len(text) - len(text.rstrip()) if text.strip() else 0


def read_template_arg(arg: str) -> str:
    """`--chat-template`'s value (vLLM's flag): the text of an existing file, else the template
    itself when it reads as jinja (braces or a line break); compiled here, so a broken template
    is refused before any weights load."""
    path = Path(arg).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # (a template text too long to be a path)
        is_file = False
    if is_file:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatFormatError(f"--chat-template {arg}: cannot read it ({e})") from None
    elif any(c in arg for c in "{}\n"):
        source = arg
    else:
        raise ChatFormatError(
            f"--chat-template {arg!r}: no such file, and not a jinja template; pass a template "
            "file (e.g. chat_template.jinja) or the template text"
        )
    if not source.strip():
        raise ChatFormatError(f"--chat-template {arg!r}: the template is empty")
    _compile(source)
    return source


def _find_template(d: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """chat_template.jinja, then chat_template.json (processor), then tokenizer_config.json."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for tpl in (read_json_dict(d / "chat_template.json", ChatFormatError).get("chat_template"),
                tokenizer_config.get("chat_template")):  # fmt: skip
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if isinstance(tpl, str) and tpl:
            return tpl
    return None


class _Raised(Exception):
    """raise_exception() called by the template: its message is the user-facing error."""


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message) from _Raised(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatFormatError(f"the chat template does not compile: {e}") from None


def render_jinja(
    source: str,
    messages: list[dict[str, Any]],
    tools: list[Any] | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render a jinja chat template the way transformers' apply_chat_template does."""
    template = _compile(source)
    try:
        return template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as e:
        if isinstance(e.__cause__, _Raised):
            raise ChatFormatError(str(e)) from None
        raise ChatFormatError(f"the chat template failed: {type(e).__name__}: {e}") from None


# ---- the built-in renderer (no template in the directory) -----------------------------------
def render_builtin(
    messages: list[dict[str, Any]],
    tools: list[Any] | None = None,
    add_generation_prompt: bool = True,
    thinking: bool = True,
    add_vision_id: bool = False,
) -> str:
    """The official Qwen 3.5 template's output, in Python; checks happen in the template's order.

    `messages` must already be normalized (tool-call arguments as dicts).
    """
    if not messages:
        raise ChatFormatError("No messages provided.")
    counts = {"Picture": 0, "Video": 0}

    def content_of(content: Any, count: bool, system: bool = False) -> str:
        if isinstance(content, str):
            return content
        if content is None:
            return ""
        if not isinstance(content, (list, tuple)):
            raise ChatFormatError("Unexpected content type.")
        parts = []
        for item in content:
            kind = _part_kind(item)
            if kind == "text":
                parts.append(str(item["text"]))
                continue
            if system:
                raise ChatFormatError(f"System message cannot contain {kind.lower()}s.")
            label = "Picture" if kind == "image" else "Video"
            if count:
                counts[label] += 1
            if add_vision_id:
                parts.append(f"{label} {counts[label]}: ")
            parts.append(IMAGE if kind == "image" else VIDEO)
        return "".join(parts)

    out: list[str] = []
    first_is_system = messages[0].get("role") == "system"
    if isinstance(tools, (list, tuple)) and tools:
        out.append("<|im_start|>system\n" + TOOLS_HEADER)
        out.extend("\n" + tojson(tool) for tool in tools)
        out.append(TOOLS_INSTRUCTIONS)
        if first_is_system:
            system = content_of(messages[0].get("content"), False, system=True).strip()
            if system:
                out.append("\n\n" + system)
        out.append("<|im_end|>\n")
    elif first_is_system:
        system = content_of(messages[0].get("content"), False, system=True).strip()
        out.append("<|im_start|>system\n" + system + "<|im_end|>\n")

    # The last user turn that is a real query (not only tool responses): assistant turns after it
    # keep their think block, earlier ones lose it.
    last_query = None
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            text = content_of(messages[i].get("content"), False).strip()
            if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                last_query = i
                break
    if last_query is None:
        raise ChatFormatError("No user query found in messages.")

    n = len(messages)
    for i, msg in enumerate(messages):
        content = content_of(msg.get("content"), True).strip()
        role = msg.get("role")
        if role == "system":
            if i != 0:
                raise ChatFormatError("System message must be at the beginning.")
        elif role == "user":
            out.append("<|im_start|>user\n" + content + "<|im_end|>\n")
        elif role == "assistant":
            out.append(_assistant(msg, content, after_query=i > last_query))
        elif role == "tool":
            if i > 0 and messages[i - 1].get("role") != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + content + "\n</tool_response>")
            if i == n - 1 or messages[i + 1].get("role") != "tool":
                out.append("<|im_end|>\n")
        else:
            raise ChatFormatError("Unexpected message role.")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n" + (THINK_OPEN if thinking else THINK_EMPTY))
    return "".join(out)


def _part_kind(item: Any) -> str:
    if isinstance(item, Mapping):
        if "image" in item or "image_url" in item or item.get("type") == "image":
            return "image"
        if "video" in item or item.get("type") == "video":
            return "video"
        if "text" in item:
            return "text"
    raise ChatFormatError("Unexpected item type in content.")


def _assistant(msg: dict[str, Any], content: str, after_query: bool) -> str:
    reasoning = msg.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:
            head, _, _ = content.partition("</think>")
            reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    if after_query:
        parts = ["<|im_start|>assistant\n<think>\n" + reasoning.strip() + "\n</think>\n\n"]
    else:
        parts = ["<|im_start|>assistant\n"]
    parts.append(content)
    calls = msg.get("tool_calls")
    if isinstance(calls, (list, tuple)):
        for j, call in enumerate(calls):
            if isinstance(call, Mapping) and "function" in call:
                call = call["function"]
            name = call.get("name") if isinstance(call, Mapping) else None
            if not isinstance(name, str):
                raise ChatFormatError(f"tool call {call!r} has no function name")
            if j == 0:
                parts.append("\n\n" if content.strip() else "")
            else:
                parts.append("\n")
            parts.append(f"<tool_call>\n<function={name}>\n")
            args = call.get("arguments", {})
            if not isinstance(args, Mapping):
                raise ChatFormatError(f"arguments of tool call {name!r} must be a mapping")
            for key, value in args.items():
                text = tojson(value) if isinstance(value, (Mapping, list, tuple)) else str(value)
                parts.append(f"<parameter={key}>\n{text}\n</parameter>\n")
            parts.append("</function>\n</tool_call>")
    parts.append("<|im_end|>\n")
    return "".join(parts)


def shared_prefix(a, b) -> int:
    """How many leading items (characters, token ids) two sequences share."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))  # fmt: skip


def cache_points(encode, shared: list[str], ids: list[int], prompt: str) -> tuple[int, ...]:
    """The prompt lengths (tokens of `ids`, the ids of the text `prompt`) the `shared` texts
    (ChatTemplate.shared_prefixes) make: how far each one's token ids start `ids`. `encode`:
    text -> ids. Each is found from the shorter side: a text that is most of the prompt (the
    conversation before this turn) by encoding what follows it in the prompt, where those ids
    end `ids` (they do where the text ends on a token boundary, as at a special token), else
    by encoding the text: the cost stays a fraction of encoding the prompt."""
    points = set()
    for text in shared:
        try:
            n = 0
            if prompt.startswith(text) and len(text) > len(prompt) // 2:
                rest = encode(prompt[len(text) :]) if len(text) < len(prompt) else []
                if len(rest) <= len(ids) and ids[len(ids) - len(rest) :] == rest:
                    n = len(ids) - len(rest)
            n = n or shared_prefix(encode(text), ids)
        except Exception:  # noqa: BLE001 - only a hint
            continue
        if n:
            points.add(n)
    return tuple(sorted(points))
