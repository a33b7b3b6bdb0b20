"""Per-request limits: how much work one HTTP request may ask for, checked before any of it is
done (each answer is a 400 naming the field and the flag that sets the limit).

- `max_seqs_per_request`: `n`, the number of prompts in a completions batch, and their product
  (every prompt x n is one sequence holding a running slot, KV blocks and sampler work).
- `max_stop`: stop strings and stop token ids per request (each one is checked at every decode
  step of its sequence); `max_stop_chars`: characters per stop string (the text held back while
  it could still match grows with it).
- `max_logit_bias`: entries of `logit_bias` (each is applied at every sampling step).
- `max_prompt_tokens`: prompt tokens (None: the model's context).
- `max_json_depth`: nesting of the JSON body (also keeps every later recursive walk, pydantic's
  and the chat template's, far from Python's recursion limit).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from qwen35.errors import Qwen35Error
from qwen35.server.protocol import APIError


@dataclass(frozen=True)
class RequestLimits:
    max_seqs_per_request: int = 128  # vLLM's and OpenAI's cap on n
    max_stop: int = 16  # OpenAI allows 4; agent frameworks often send more
    max_stop_chars: int = 128
    max_logit_bias: int = 300
    max_prompt_tokens: int | None = None
    max_json_depth: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or v < 1):
                flag = "--" + f.name.replace("_", "-")
                raise Qwen35Error(f"{flag} must be an integer >= 1, got {v!r}")


def check_json(data: Any, max_depth: int) -> None:
    """Reject bodies nested deeper than `max_depth` and strings with lone surrogates (JSON allows
    `"\\ud800"`, UTF-8 cannot encode it: it would fail later in the tokenizer or the response)."""
    problem = _first_problem(data, max_depth)
    if problem is None:
        return
    kind, path = problem
    where = _path_text(path) or "the body"
    if kind == "depth":
        raise APIError(
            f"the request body nests deeper than {max_depth} levels (at {where})",
            param=where if path else None,
            code="nested_too_deeply",
        )
    raise APIError(
        f"{where} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
        "which is not valid Unicode",
        param=where if path else None,
    )


def _first_problem(data: Any, max_depth: int) -> tuple[str, tuple] | None:
    # iterative, so any depth is safe; paths are built only for the offending node
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and not _utf8_ok(node):
                return "surrogate", path
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                return "depth", path
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(key, str) and not key.isascii() and not _utf8_ok(key):
                    return "surrogate", (*path, key)
                if isinstance(value, (str, dict, list)):
                    stack.append((value, depth + 1, (*path, key)))
    return None


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path_text(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def check_request_size(
    data: dict[str, Any], limits: RequestLimits, prompt_limit: int, context: int | None
) -> None:
    """Size checks on the parsed body before validation builds anything from it (wrong types are
    left to validation); `prompt_limit`: the resolved max_prompt_tokens."""
    n = data.get("n")
    cap = limits.max_seqs_per_request
    if isinstance(n, int) and not isinstance(n, bool) and n > cap:
        raise APIError(
            f"n must be at most {cap} (the server's --max-seqs-per-request), got {n}", param="n"
        )
    stop = data.get("stop")
    if isinstance(stop, list):
        if len(stop) > limits.max_stop:
            raise APIError(
                f"at most {limits.max_stop} stop strings are allowed (the server's --max-stop), "
                f"got {len(stop)}",
                param="stop",
            )
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    for s in stops:
        if isinstance(s, str) and len(s) > limits.max_stop_chars:
            raise APIError(
                f"a stop string may have at most {limits.max_stop_chars} characters, "
                f"got one of {len(s)}",
                param="stop",
            )
    ids = data.get("stop_token_ids")
    if isinstance(ids, list) and len(ids) > limits.max_stop:
        raise APIError(
            f"at most {limits.max_stop} stop_token_ids are allowed (the server's --max-stop), "
            f"got {len(ids)}",
            param="stop_token_ids",
        )
    bias = data.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > limits.max_logit_bias:
        raise APIError(
            f"logit_bias may have at most {limits.max_logit_bias} entries, got {len(bias)}",
            param="logit_bias",
        )
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > cap:
            raise APIError(
                f"a request may carry at most {cap} prompts (the server's "
                f"--max-seqs-per-request), got {len(prompt)}",
                param="prompt",
            )
        if isinstance(n, int) and not isinstance(n, bool) and n * len(prompt) > cap:
            raise APIError(
                f"{len(prompt)} prompts x n={n} make {n * len(prompt)} sequences, more than the "
                f"server's limit of {cap} (--max-seqs-per-request)",
                param="n",
            )
        for p in prompt:
            if isinstance(p, list):
                check_prompt_tokens(len(p), prompt_limit, context, "prompt")
    elif isinstance(prompt, list):  # one prompt of token ids
        check_prompt_tokens(len(prompt), prompt_limit, context, "prompt")


def check_prompt_tokens(num_tokens: int, limit: int, context: int | None, param: str) -> None:
    if num_tokens <= limit:
        return
    if context is not None and limit >= context:
        raise APIError(
            f"this model's context is {context} tokens, but the prompt alone has {num_tokens}; "
            "shorten it",
            param=param,
            code="context_length_exceeded",
        )
    raise APIError(
        f"the prompt has {num_tokens} tokens, more than the server's limit of {limit} "
        "(--max-prompt-tokens); shorten it",
        param=param,
        code="prompt_too_long",
    )
