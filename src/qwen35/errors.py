"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


def shown(text: object, limit: int = 120) -> str:
    """`text` for an error message: cut to `limit` characters, "..." marking a cut."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


class Qwen35Error(Exception):
    """Bad input or an impossible request; the message says what was wrong and what to do."""
