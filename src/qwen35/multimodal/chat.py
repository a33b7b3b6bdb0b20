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
            if kind == "image_url" or (kind is None and "image_url" in part):
                media["image"].append(_url(part.get("image_url"), "image_url"))
                parts.append({"type": "image"})
            elif kind == "image" or (kind is None and "image" in part):
                media["image"].append(part.get("image"))
                parts.append({"type": "image"})
            elif kind == "video_url" or (kind is None and "video_url" in part):
                media["video"].append(_url(part.get("video_url"), "video_url"))
                parts.append({"type": "video"})
            elif kind == "video" or (kind is None and "video" in part):
                media["video"].append(part.get("video"))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        for v in media["image"] + media["video"]:
            if v is None:
                raise MediaError("an image / video part has no data")
        out.append({**msg, "content": parts})
    return out, {k: v for k, v in media.items() if v}
