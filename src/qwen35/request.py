"""Per-request types shared by the engine, the scheduler and the server. No torch here.

- `SamplingParams`: what the user asks for (vLLM-style names); `validate()` raises a clear error.
- `StructuredOutputs`: a constraint on the output (JSON schema, regex, choice, Lark grammar),
  enforced by constrained decoding (`engine/structured/`).
- `RequestOutput`: what the engine returns, whole or as a streaming delta.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from qwen35.errors import Qwen35Error

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_N = 1 << 16  # sequences one request may ask for (each a Sequence, a state slot when run)
MAX_LOGIT_BIAS = 1024  # entries; each costs every decode step of its row
MAX_ALLOWED_TOKENS = 1 << 17  # allowed_token_ids entries
MAX_BAD_WORDS = 1024  # bad_words entries; each is matched against the output every step
MAX_SALT = 1024  # cache_salt characters
PRIORITY_MAX = 2**31 - 1  # |priority|: an int32, as a scheduler field anywhere


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
    # top-n logprobs of each prompt token after the first, given the tokens before it (vLLM's
    # prompt_logprobs; 0: only the prompt's own token); such a request computes its prompt
    # itself (no prefix-cache hit) and returns them in its first output
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100] (OpenAI)
    structured_outputs: StructuredOutputs | None = None  # constrained decoding
    # vLLM's: sample only among these token ids (e.g. a classifier's label tokens)
    allowed_token_ids: list[int] | None = None
    # vLLM's: words never generated: a word's last token is banned where the output ends in
    # the tokens before it (each word with and without a leading space; the engine tokenizes
    # them into bad_words_token_ids)
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # vLLM's: keep only the prompt's last N tokens (a prompt longer than the context is cut)
    truncate_prompt_tokens: int | None = None
    # vLLM's scheduling priority: lower runs earlier, on engines started with
    # scheduling_policy="priority" (the others take only 0)
    priority: int = 0
    # vLLM's cache_salt: prompts share prefix-cache blocks only with requests of the same salt
    # (one tenant's cached prompts cannot be detected by another's timing)
    cache_salt: str | None = None
    # prompt lengths (tokens) where a prefix other requests share ends, e.g. a chat's system
    # prompt and tools (the server and LLM.chat set it): the prefix cache places a state
    # checkpoint at the last block boundary at or before each, and --prefix-cache-dir a segment
    cache_points: tuple[int, ...] = ()
    # vLLM's thinking_token_budget: a reply that is still inside the think block the prompt
    # opened after this many tokens gets its end-of-think token next (then it answers); the
    # engine fills think_end_token_id (None: the prompt leaves the model not thinking)
    thinking_token_budget: int | None = None
    think_end_token_id: int | None = None

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
        """Raise SamplingParamsError naming the first bad field. Floats must be finite and stay
        in range as float32 (the sampler's precision): 1e-46 is 0 there, 1e-50 too."""

        def bad(msg: str, param: str) -> SamplingParamsError:
            return SamplingParamsError(msg, param)

        def integer(name: str, lo: int, hi: int | None = None, *, none_ok: bool = False) -> None:
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise bad(f"{name} must be an integer {rng}, got {v!r}", name)

        def real(name: str, lo: float, hi: float, lo_open: bool = False) -> float:
            v = getattr(self, name)
            f = _float32(v)  # None: not a finite number; checked in float32 too (1e-46 -> 0)
            ok = f is not None and (lo < f if lo_open else lo <= v) and v <= hi
            if not ok:
                rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
                note = f" ({f} as a float32, the sampler's precision)" if f not in (None, v) else ""
                raise bad(f"{name} must be a finite number in {rng}, got {v!r}{note}", name)
            return f

        integer("n", 1, MAX_N)
        integer("max_tokens", 1, none_ok=True)
        real("temperature", 0.0, 2.0)
        real("top_p", 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad(
                f"top_k must be 0 (off), -1 (off) or a positive integer, got {self.top_k!r}",
                "top_k",
            )
        real("min_p", 0.0, 1.0)
        # it divides (multiplies) logits: far from 1 it turns them into inf (0)
        real("repetition_penalty", 0.01, 100.0)
        real("presence_penalty", -2.0, 2.0)
        real("frequency_penalty", -2.0, 2.0)
        integer("logprobs", 0, 20, none_ok=True)
        integer("prompt_logprobs", 0, 20, none_ok=True)
        integer("min_tokens", 0)
        if self.seed is not None:
            if not _is_int(self.seed):
                raise bad(f"seed must be an integer, got {self.seed!r}", "seed")
            # request i of n draws with seed + i: every one must be a valid generator seed
            if not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
                raise bad(
                    f"seed must be in [{SEED_MIN}, {SEED_MAX - (self.n - 1)}] with n={self.n} "
                    f"(sequence i uses seed + i), got {self.seed}",
                    "seed",
                )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a list of non-empty strings", "stop")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of non-negative integers", "stop_token_ids")
        if self.logit_bias is not None:
            self._validate_logit_bias()
        integer("truncate_prompt_tokens", 1, none_ok=True)
        integer("priority", -PRIORITY_MAX, PRIORITY_MAX)
        integer("thinking_token_budget", 0, none_ok=True)
        if not isinstance(self.cache_points, (tuple, list)) or any(
            not _is_int(t) or t < 1 for t in self.cache_points
        ):
            raise bad("cache_points must be a list of prompt lengths (integers >= 1)",
                      "cache_points")  # fmt: skip
        salt = self.cache_salt
        if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > MAX_SALT):
            raise bad(f"cache_salt must be a non-empty string of at most {MAX_SALT} characters",
                      "cache_salt")  # fmt: skip
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, list) or not ids or any(not _is_int(t) or t < 0 for t in ids):
                raise bad("allowed_token_ids must be a non-empty list of token ids (integers "
                          ">= 0)", "allowed_token_ids")  # fmt: skip
            if len(ids) > MAX_ALLOWED_TOKENS:
                raise bad(f"allowed_token_ids has {len(ids)} entries; at most "
                          f"{MAX_ALLOWED_TOKENS} are allowed", "allowed_token_ids")  # fmt: skip
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, list) or any(
                not isinstance(w, str) or not w.strip() for w in words
            ):
                raise bad("bad_words must be a list of non-empty strings", "bad_words")
            if len(words) > MAX_BAD_WORDS:
                raise bad(f"bad_words has {len(words)} entries; at most {MAX_BAD_WORDS} are "
                          "allowed", "bad_words")  # fmt: skip
        bw = self.bad_words_token_ids
        if bw is not None and (not isinstance(bw, list) or any(
            not isinstance(w, list) or not w or any(not _is_int(t) or t < 0 for t in w) for w in bw
        )):  # fmt: skip
            raise bad("bad_words_token_ids must be a list of non-empty lists of token ids",
                      "bad_words_token_ids")  # fmt: skip
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

    def _validate_logit_bias(self) -> None:
        lb = self.logit_bias
        if not isinstance(lb, dict):
            raise SamplingParamsError(
                f"logit_bias must map token ids to numbers, got {type(lb).__name__}", "logit_bias"
            )
        if len(lb) > MAX_LOGIT_BIAS:
            raise SamplingParamsError(
                f"logit_bias has {len(lb)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                "logit_bias",
            )
        for tok, bias in lb.items():
            if not _is_int(tok) or tok < 0:
                raise SamplingParamsError(
                    f"logit_bias keys must be token ids (integers >= 0), got {tok!r}", "logit_bias"
                )
            f = _float32(bias)
            if f is None or not -100.0 <= f <= 100.0:
                raise SamplingParamsError(
                    f"logit_bias values must be finite numbers in [-100, 100], got {bias!r} "
                    f"for token {tok}",
                    "logit_bias",
                )

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model's vocabulary."""
        words = self.bad_words_token_ids or ()
        bad = [t for w in words for t in w if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"bad_words_token_ids names token {bad[0]}, outside the vocabulary of "
                f"{vocab_size}", "bad_words_token_ids",
            )  # fmt: skip
        bad = [t for t in self.allowed_token_ids or () if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"allowed_token_ids names token {bad[0]}, outside the vocabulary of {vocab_size}",
                "allowed_token_ids",
            )
        for tok in self.logit_bias or {}:
            if tok >= vocab_size:
                raise SamplingParamsError(
                    f"logit_bias names token {tok}, outside the vocabulary of {vocab_size}",
                    "logit_bias",
                )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _float32(v: object) -> float | None:
    """v as the sampler will see it (a float32), or None if it is not a finite number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = struct.unpack("f", struct.pack("f", float(v)))[0]
    except (OverflowError, struct.error):  # beyond float32's range
        return None
    return f if math.isfinite(f) else None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, top-n
    rank: int | None = None  # 1 + how many tokens are more likely (prompt logprobs only)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None: running
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
    # SamplingParams.prompt_logprobs: None for the first prompt token (nothing before it), then
    # one per prompt token; in the request's first output only
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished times
    # Set (with finished=True) when the engine failed this request: a step raised while it ran.
    # Other requests go on; the text says what failed, for the log (not for clients).
    error: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in self.outputs)
        prompt = len(self.prompt_token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
