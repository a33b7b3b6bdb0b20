"""A checkpoint's `generation_config.json` as request defaults (vLLM's `--generation-config auto`).

Qwen ships its recommended sampling there (Qwen3's: temperature 0.6, top_p 0.95, top_k 20). The
server and `LLM.generate(prompts)` without params use these for the fields a request leaves
unset: temperature, top_p, top_k, min_p, repetition_penalty; a request's own values always win,
and `--generation-config none` gives OpenAI's defaults (temperature 1, no top-k). EOS ids from
the same file are read by tokenizer.py. A value that is not a valid setting is skipped with a
warning (the file is the checkpoint's, not the user's request). `--override-generation-config
JSON` (vLLM's flag) sets defaults over the file's (or over OpenAI's with `none`), presence and
frequency penalties too; its values are the user's, so a bad one is refused (check_overrides).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen35")

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# --override-generation-config (vLLM's flag) may also set these
OVERRIDE_KEYS = (*SAMPLING_KEYS, "presence_penalty", "frequency_penalty")


def _invalid(key: str, value: Any) -> str | None:
    """Why `value` is not a valid request default for `key` (SamplingParams' own checks), or
    None."""
    from qwen35.request import SamplingParams

    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"not a number: {value!r}")
        SamplingParams(**{key: value}).validate()
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def check_overrides(overrides) -> dict[str, Any]:
    """`--override-generation-config`'s request defaults, checked: a JSON object of
    OVERRIDE_KEYS with valid values (SamplingParams' own checks), else a Qwen35Error naming
    what is wrong."""
    from qwen35.errors import Qwen35Error

    if not isinstance(overrides, dict):
        raise Qwen35Error(f"override_generation_config must be a JSON object such as "
                          f'{{"temperature": 0.7}}, got {type(overrides).__name__}')  # fmt: skip
    for k, v in overrides.items():
        if k not in OVERRIDE_KEYS:
            raise Qwen35Error(f"override_generation_config: {k!r} is not a request default this "
                              f"engine takes ({', '.join(OVERRIDE_KEYS)})")  # fmt: skip
        if (why := _invalid(k, v)) is not None:
            raise Qwen35Error(f"override_generation_config: {k}={v!r}: {why}")
    return dict(overrides)


def sampling_defaults(model_dir: Path | str | None) -> dict[str, Any]:
    """The valid sampling defaults of model_dir/generation_config.json ({} without one)."""
    from qwen35.errors import Qwen35Error
    from qwen35.tokenizer import read_json_dict

    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = read_json_dict(path, Qwen35Error)
    except Qwen35Error as e:
        log.warning("ignoring %s for request defaults: %s", path.name, e)
        return {}
    out: dict[str, Any] = {}
    for k in SAMPLING_KEYS:
        v = cfg.get(k)
        if v is None:
            continue
        if (why := _invalid(k, v)) is not None:
            log.warning("ignoring %s's %s=%r: %s", path.name, k, v, why)
            continue
        out[k] = v
    return out


def describe(defaults: dict[str, Any], overridden: bool = False) -> str:
    items = ", ".join(f"{k}={v}" for k, v in defaults.items())
    where = ("generation_config.json and --override-generation-config" if overridden
             else "generation_config.json")  # fmt: skip
    return (
        f"request defaults from {where}: {items} (a request's own values win; "
        "--generation-config none for OpenAI's)"
    )
