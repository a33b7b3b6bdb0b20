"""User media -> images / video frames: PIL images, uint8 numpy arrays, file paths, `data:`
URLs (base64) and, only for domains the operator allows, http(s) URLs (size and time limits).

Videos are lists of frames (or a uint8 [T, H, W, 3] array), or an animated GIF / WebP / PNG
(decoded by Pillow; other containers need a video decoder this package does not ship).
Everything that goes wrong raises `MediaError` with what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from qwen35.errors import shown
from qwen35.multimodal.sizing import MediaError

MAX_DECODED_PIXELS = 1 << 28  # refuse decompression bombs (268M pixels)


@dataclass(frozen=True)
class MediaOptions:
    allowed_domains: tuple[str, ...] = ()  # http(s) fetching: off unless domains are listed
    allow_local_files: bool = True  # file paths (the Python API; the server turns this off)
    max_bytes: int = 32 << 20  # encoded size of one fetched / decoded item
    timeout_s: float = 10.0
    max_frames: int = 768
    video_fps: float = 2.0  # frames per second sampled from animations (transformers' default)


def _open_bytes(data: bytes, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_DECODED_PIXELS:
            raise MediaError(f"{what} is {img.width}x{img.height} pixels: too large to decode")
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{what} is not an image Pillow can read ({e})") from None


def _fetch(url: str, opts: MediaOptions) -> bytes:
    host = (urlparse(url).hostname or "").lower()
    ok = any(host == d or host.endswith("." + d) for d in opts.allowed_domains)
    if not opts.allowed_domains or not ok:
        raise MediaError(
            f"fetching media from {host or url!r} is not allowed: send the image inline as a "
            "data: URL (base64), or start the server with --allowed-media-domains"
        )
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=opts.timeout_s) as r:
            data = r.read(opts.max_bytes + 1)
    except Exception as e:
        raise MediaError(f"could not fetch {url}: {e}") from None
    if len(data) > opts.max_bytes:
        raise MediaError(f"{url} is larger than the {opts.max_bytes} byte limit")
    return data


def source_bytes(source: str, opts: MediaOptions) -> tuple[bytes, str]:
    """Bytes of a data: URL, an http(s) URL or a file path; and a short name for messages."""
    if source.startswith("data:"):
        head, sep, payload = source.partition(",")
        if not sep or ";base64" not in head:
            raise MediaError("a data: URL must look like data:image/png;base64,<base64 data>")
        if len(payload) > opts.max_bytes * 4 // 3 + 4:
            raise MediaError(f"the data: URL is larger than the {opts.max_bytes} byte limit")
        try:
            return base64.b64decode(payload, validate=True), "the data: URL"
        except (binascii.Error, ValueError):
            raise MediaError("the data: URL is not valid base64") from None
    if source.startswith(("http://", "https://")):
        return _fetch(source, opts), source
    if "://" in source:
        raise MediaError(f"unsupported media URL scheme in {source[:40]!r}: use data: or https:")
    if not opts.allow_local_files:
        raise MediaError("media must be a data: URL (base64) or an allowed https URL, not a path")
    p = Path(source).expanduser()
    name = shown(source)
    try:
        if not p.is_file():
            raise MediaError(f"no media file at {name!r}")
        if p.stat().st_size > opts.max_bytes:
            raise MediaError(f"{name} is larger than the {opts.max_bytes} byte limit")
        return p.read_bytes(), name
    except OSError as e:  # too long a name, no permission, ...
        raise MediaError(f"cannot read the media file {name!r}: {e.strerror or e}") from None


def load_image(source, opts: MediaOptions):
    """A PIL image or uint8 array (returned as is), or a path / data: / http(s) URL (decoded)."""
    from PIL import Image

    if isinstance(source, (Image.Image, np.ndarray)):
        return source
    if isinstance(source, str):
        data, what = source_bytes(source, opts)
        return _open_bytes(data, what)
    raise MediaError(
        f"an image must be a URL, a path, a PIL image or an array, not {type(source).__name__}"
    )


def load_video(source, opts: MediaOptions) -> tuple[list, float | None]:
    """Frames and their frame rate (None: unknown). Lists / arrays of frames are used as given;
    an animation is sampled at opts.video_fps (at least 4 frames, as transformers)."""
    if isinstance(source, dict) and "frames" in source:
        return load_video(source["frames"], opts)[0], source.get("fps")
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise MediaError(f"a video array must be [T, H, W, C], got shape {list(source.shape)}")
        return list(source), None
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("a video needs at least one frame")
        return [load_image(f, opts) for f in source], None
    if not isinstance(source, str):
        raise MediaError(f"a video must be frames or a URL, not {type(source).__name__}")
    data, what = source_bytes(source, opts)
    try:
        img = _open_bytes(data, what)
    except MediaError:
        raise MediaError(
            f"{what} is not a video this server can decode: videos are accepted as animated GIF / "
            "WebP / PNG or as lists of frames (mp4 and other containers need a decoder: send "
            "frames instead)"
        ) from None
    n = getattr(img, "n_frames", 1)
    if n < 2:
        raise MediaError(
            f"{what} is not an animation; videos are accepted as animated GIF / WebP / PNG "
            "or as lists of frames (other video containers need a decoder)"
        )
    durations, frames = [], []
    for i in range(n):
        img.seek(i)
        durations.append(img.info.get("duration") or 100)
        frames.append(img.convert("RGB"))
    fps = 1000.0 * n / sum(durations)
    want = int(n / fps * opts.video_fps)
    want = min(max(want, 4), opts.max_frames, n)
    idx = np.linspace(0, n - 1, want).round().astype(int)
    return [frames[i] for i in idx], fps * want / n
