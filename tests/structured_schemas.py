"""50 varied JSON schemas for the structured-output tests: nested objects, arrays with min/max
items, enums, bounded numbers, required/optional properties, `additionalProperties: false`,
strings with patterns. Strings and arrays are bounded so a random-weight model (whose free text
never ends) still finishes within a small max_tokens."""

from __future__ import annotations

import random

WORD = {"type": "string", "maxLength": 6}
CODE = {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}
COLOR = {"type": "string", "enum": ["red", "green", "blue"]}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCORE = {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25}  # bounded digits
FLAG = {"type": "boolean"}
TAGS = {"type": "array", "items": COLOR, "minItems": 1, "maxItems": 3}
IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}
LEAVES = {"word": WORD, "code": CODE, "color": COLOR, "age": AGE, "score": SCORE, "flag": FLAG,
          "tags": TAGS, "ids": IDS, "nothing": {"type": "null"},
          "either": {"anyOf": [AGE, COLOR]}, "const": {"const": "v1"}}  # fmt: skip


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(sorted(LEAVES), rng.randint(1, 4))
    props = {n: LEAVES[n] for n in names}
    if depth > 0 and rng.random() < 0.6:
        props["child"] = _object(rng, depth - 1)
    if depth > 0 and rng.random() < 0.3:
        props["items"] = {"type": "array", "items": _object(rng, 0), "minItems": 1, "maxItems": 2}
    required = [n for n in props if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}  # fmt: skip


def schemas(n: int = 50, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = [_object(rng, depth=rng.randint(0, 2)) for _ in range(n - 4)]
    out += [
        {"type": "array", "items": AGE, "minItems": 2, "maxItems": 3},
        COLOR,
        {"type": "object", "properties": {"code": CODE}, "required": ["code"],
         "additionalProperties": False},
        {"type": "object", "properties": {"point": {"type": "array", "items": SCORE,
         "minItems": 2, "maxItems": 2}}, "required": ["point"], "additionalProperties": False},
    ]  # fmt: skip
    return out
