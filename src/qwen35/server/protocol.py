"""OpenAI-compatible request and response models (pydantic), and the API error type.

Requests accept the engine's extra sampling options as body fields the way vLLM does (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, ...); unknown fields
are ignored so newer clients keep working. Range checks live in `SamplingParams.validate()` (one
place for the rules); pydantic only checks types.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwen35.request import SamplingParams, SamplingParamsError


class APIError(Exception):
    """An error returned in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code=None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk with output carries the usage so far
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None  # (unset: the engine's default, else 0)
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM-style extras (the engine's other sampling options)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> bias in [-100, 100]
    best_of: int | None = None  # only best_of == n (no ranking of extra samples)
    # vLLM's prompt_logprobs: each prompt token's logprob (and rank, and the top-n) given
    # the tokens before it; completions return them per choice, chat completions once
    prompt_logprobs: int | None = None
    # vLLM's: sample only among these tokens; words never generated; keep the prompt's last N
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0  # vLLM's: lower runs earlier (servers started with --scheduling-policy priority)
    # vLLM's: the prompt's and each choice's token ids in the reply (RL and debugging clients)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"
    cache_salt: str | None = None  # vLLM's: prefix-cache hits only among the same salt
    thinking_token_budget: int | None = None  # vLLM's: think at most this many tokens
    use_beam_search: bool = False  # refused: no beam search here (never silently sampled)
    # output constraints (server/structured.py): OpenAI's and vLLM's shapes
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, defaults: dict | None = None
    ) -> SamplingParams:
        """The engine's SamplingParams, validated (SamplingParamsError names the bad field).
        `defaults`: values for the fields the request leaves unset (the checkpoint's
        generation_config.json: generation_config.py), before OpenAI's."""
        d = defaults or {}

        def pick(name: str, given, openai):
            return given if given is not None else d.get(name, openai)

        if self.use_beam_search:
            raise SamplingParamsError(
                "use_beam_search is not supported: this engine samples (or decodes greedily "
                "with temperature 0); drop use_beam_search, or request n samples and pick",
                "use_beam_search",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise SamplingParamsError(
                f"best_of={self.best_of} is not supported: only best_of == n ({self.n}), which "
                "returns every sample; request n samples and pick among them instead",
                "best_of",
            )
        p = SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=pick("temperature", self.temperature, 1.0),
            top_p=pick("top_p", self.top_p, 1.0),
            top_k=pick("top_k", self.top_k, 0),
            min_p=pick("min_p", self.min_p, 0.0),
            repetition_penalty=pick("repetition_penalty", self.repetition_penalty, 1.0),
            presence_penalty=pick("presence_penalty", self.presence_penalty, 0.0),
            frequency_penalty=pick("frequency_penalty", self.frequency_penalty, 0.0),
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=_token_keys(self.logit_bias),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            priority=self.priority,
            cache_salt=self.cache_salt,
            thinking_token_budget=self.thinking_token_budget,
        )
        return p.validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


def _token_keys(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends logit_bias keys as strings ("50256": -100); the engine wants token ids."""
    if bias is None:
        return None
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 12):
            raise SamplingParamsError(
                f"logit_bias keys must be token ids (non-negative integers), got {k[:40]!r}",
                "logit_bias",
            )
        out[int(k)] = v
    return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}


class ChatMessage(BaseModel):
    # Content parts, tool calls and reasoning pass through to the chat template as given.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's chat extras: no assistant header after the messages; or end the prompt inside the
    # final message so the model continues it; echo puts that message's text before the reply
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    include_reasoning: bool = True  # vLLM's: false leaves reasoning_content out of the reply
    chat_template: str | None = None  # vLLM's: this request's own (--trust-request-chat-template)
    documents: list[dict[str, Any]] | None = None  # vLLM's: passed to the template (RAG ones)
    # vLLM's: the image processor's min_pixels / max_pixels for this request (fewer tokens)
    mm_processor_kwargs: dict[str, Any] | None = None
    # OpenAI's: "none" / "minimal" turn Qwen's thinking off, other values on (as the Responses
    # API's reasoning.effort here); chat_template_kwargs.enable_thinking, when given, wins
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


# ---- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": N}, as OpenAI's
    completion_tokens_details: dict[str, int] | None = None  # {"reasoning_tokens": N} (chat)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # (vLLM's, with return_token_ids)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # (vLLM's field)
    prompt_token_ids: list[int] | None = None  # (vLLM's, with return_token_ids)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # (vLLM's field)
    token_ids: list[int] | None = None  # (vLLM's, with return_token_ids)
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwen35"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
