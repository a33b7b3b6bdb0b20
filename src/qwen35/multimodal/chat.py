"""Media parts of chat messages (OpenAI / vLLM style) -> the parts the Qwen template renders,
and the images / videos in prompt order.

Accepted parts: {"type": "image_url", "image_url": {"url": ...}} (or a bare string),
{"type": "image", "image": ...}, {"type": "video_url", "video_url": {"url": ...}} (vLLM's
convention; the official template only knows "video", so it is rewritten to that),
{"type": "video", "video": ...}. The template then writes one placeholder per item, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qwen35.multimodal.sizing import MediaError

# a media part's type, or for an untyped part the first of these keys it has
_KEYS = ("image_url", "image", "video_url", "video")


def _url(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        if "url" not in value:
            raise MediaError(f"a {key} part needs {{'{key}': {{'url': ...}}}}")
        return value["url"]
    return value


def extract_media(messages: list[Any]) -> tuple[list[Any], dict[str, list]]:
    """-> (messages with media parts in template form, {"image": [...], "video": [...]})."""
    media: dict[str, list] = {"image": [], "video": []}
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, (list, tuple)):
            out.append(msg)
            continue
        parts = []
        for part in content:
            if not isinstance(part, Mapping):
                parts.append(part)
                continue
            kind = part.get("type")
            key = next((k for k in _KEYS if kind == k or (kind is None and k in part)), None)
            if key is None:
                parts.append(part)
                continue
            media_kind = key.removesuffix("_url")
            value = part.get(key)
            media[media_kind].append(_url(value, key) if key != media_kind else value)
            parts.append({"type": media_kind})
        for v in media["image"] + media["video"]:
            if v is None:
                raise MediaError("an image / video part has no data")
        out.append({**msg, "content": parts})
    return out, {k: v for k, v in media.items() if v}
