"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class Qwen35Error(Exception):
    """Bad input or an impossible request; the message says what was wrong and what to do."""
