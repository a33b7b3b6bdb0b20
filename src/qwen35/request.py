"""Per-request types shared by the engine, the scheduler and the server. No torch here.

- `SamplingParams`: what the user asks for (vLLM-style names); `validate()` raises a clear error.
- `StructuredOutputs`: a constraint on the output (JSON schema, regex, choice, Lark grammar),
  enforced by constrained decoding (`engine/structured/`).
- `RequestOutput`: what the engine returns, whole or as a streaming delta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qwen35.errors import Qwen35Error


class SamplingParamsError(Qwen35Error, ValueError):
    """An invalid sampling parameter; `param` names it (the server's OpenAI error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of `json` (a JSON schema, dict or text), `json_object` (any JSON object),
    `regex`, `choice` (one of these strings) or `grammar` (Lark syntax, llguidance's dialect).

    `whitespace_pattern`: a regex for the whitespace JSON may hold between tokens; None (the
    default) gives compact JSON (`{"a":1,"b":[2,3]}`), so a weak model cannot fill max_tokens
    with spaces inside a valid prefix. `after_think`: the constraint starts after the first
    `</think>` token (a thinking model reasons freely first); the server sets it when the chat
    prompt leaves thinking on.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None
    after_think: bool = False

    def validate(self, param: str = "structured_outputs") -> StructuredOutputs:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise SamplingParamsError(
                f"{param} needs exactly one of json, json_object, regex, choice or grammar, "
                f"got {kinds or 'none'}",
                param,
            )
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise SamplingParamsError(
                        f"{param}: the JSON schema is not JSON: {e}", param
                    ) from None
            if not isinstance(schema, dict) and schema is not True:
                raise SamplingParamsError(f"{param}: a JSON schema must be an object", param)
        for k in ("regex", "grammar", "whitespace_pattern"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or (not v and k != "whitespace_pattern")):
                raise SamplingParamsError(f"{param}: {k} must be a non-empty string", param)
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise SamplingParamsError(f"{param}: choice must be a list of non-empty strings", param)
        return self

    def key(self) -> str:
        """A canonical text of the constraint (the compiled-grammar cache key)."""
        d = {k: v for k, v in vars(self).items() if v not in (None, False) and k != "after_think"}
        if isinstance(d.get("json"), str):
            d["json"] = json.loads(d["json"])
        return json.dumps(d, sort_keys=True, ensure_ascii=False)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: only the chosen one)
    min_tokens: int = 0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # constrained decoding

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingParams:
        def bad(msg: str, param: str) -> SamplingParamsError:
            return SamplingParamsError(msg, param)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}", "n")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad(f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(
                f"top_k must be 0 (off), -1 (off) or a positive integer, got {self.top_k!r}",
                "top_k",
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.repetition_penalty <= 0.0:
            raise bad(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                "repetition_penalty",
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
                "presence_penalty",
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
                "frequency_penalty",
            )
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20
        ):
            raise bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}", "logprobs")
        if self.min_tokens < 0:
            raise bad(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a list of non-empty strings", "stop")
        if isinstance(self.structured_outputs, dict):  # the vLLM dict form
            try:
                self.structured_outputs = StructuredOutputs(**self.structured_outputs)
            except TypeError as e:
                raise bad(f"structured_outputs: {e}", "structured_outputs") from None
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputs):
                raise bad("structured_outputs must be a StructuredOutputs", "structured_outputs")
            self.structured_outputs.validate()
        return self


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, top-n


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """Whole output (LLM.generate) or a delta (streaming: text/token_ids/logprobs are new only)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished times

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in self.outputs)
        prompt = len(self.prompt_token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
