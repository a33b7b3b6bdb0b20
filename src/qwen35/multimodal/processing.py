"""Qwen 3.5 image and video preprocessing, equal to transformers' processors, in numpy + Pillow.

Images follow `Qwen2VLImageProcessorPil`: RGB (transparency composited onto white), bicubic
resize to the `smart_resize` grid, x/255 in float64 cast to float32, (x - mean) / std in float32,
then flattened into [num_patches, C * temporal_patch * patch * patch] rows in 2x2-merge-block
order with the one frame repeated over the temporal patch.

Videos follow `Qwen3VLVideoProcessor`'s grid (the pixel budget covers all frames, frames are padded
to a multiple of the temporal patch by repeating the last) and timestamps; each frame is resized
like an image (Pillow bicubic: transformers' video processor resizes with torchvision, which this
package does not require, so video pixels can differ from it by interpolation rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qwen35.errors import shown
from qwen35.multimodal.sizing import (
    MediaError,
    VisionPreprocessConfig,
    num_tokens,
    smart_resize,
    smart_resize_video,
)


@dataclass
class ProcessedMedia:
    """One image or video ready for the encoder."""

    kind: str  # "image" | "video"
    pixel_values: np.ndarray  # [t*h*w, C*tp*p*p] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    timestamps: tuple[float, ...] = ()  # videos: seconds of each temporal patch
    content_hash: bytes = b""  # what prefix caching keys this item's tokens by

    def num_tokens(self, merge_size: int) -> int:
        return num_tokens(self.grid, merge_size)


def load_preprocess_config(model_dir: str | Path | None) -> VisionPreprocessConfig:
    """Defaults, overridden by the directory's preprocessor_config.json / video_preprocessor_config."""
    cfg = VisionPreprocessConfig()
    if model_dir is None:
        return cfg
    d = Path(model_dir)
    upd: dict = {}
    for fname, video in (
        ("preprocessor_config.json", False),
        ("video_preprocessor_config.json", True),
    ):
        p = d / fname
        if not p.is_file():
            continue
        try:
            raw = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MediaError(f"{p} is not valid JSON") from None
        try:
            upd.update(_preprocess_fields(raw, video))
        except (TypeError, ValueError, AttributeError) as e:
            raise MediaError(
                f"{p} has a value of the wrong type ({shown(e)}); fix it or re-download it"
            ) from None
    return replace(cfg, **upd)


def _preprocess_fields(raw: dict, video: bool) -> dict:
    """The fields of one preprocessor config qwen35 reads; ValueError / TypeError when bad."""

    def positive(key: str, v) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v <= 0:
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
        return int(v)

    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    upd: dict = {}
    size = raw.get("size") or {}
    lo = size.get("shortest_edge", raw.get("min_pixels"))
    hi = size.get("longest_edge", raw.get("max_pixels"))
    if lo is not None:
        upd["video_min_pixels" if video else "min_pixels"] = positive("shortest_edge", lo)
    if hi is not None:
        upd["video_max_pixels" if video else "max_pixels"] = positive("longest_edge", hi)
    if not video:
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if key in raw:
                upd[key] = positive(key, raw[key])
        for key in ("image_mean", "image_std"):
            if key in raw:
                v = raw[key]
                ok = isinstance(v, list) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
                )
                vals = tuple(float(x) for x in v) if ok else ()
                if len(vals) != 3 or not all(math.isfinite(x) for x in vals):
                    raise ValueError(f"{key} must be 3 finite numbers, got {raw[key]!r}")
                if key == "image_std" and min(vals) <= 0:
                    raise ValueError(f"image_std must be positive, got {raw[key]!r}")
                upd[key] = vals
    return upd


def to_rgb_array(image) -> np.ndarray:
    """A PIL image or a uint8 array ([H, W], [H, W, 1|3|4]) -> uint8 [H, W, 3]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(bg, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise MediaError(
                f"image arrays must be uint8 [H, W, 3] (0-255), got dtype {image.dtype}: "
                "convert with (x * 255).round().astype(np.uint8)"
            )
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise MediaError(f"image arrays must be [H, W, 1|3|4], got shape {list(image.shape)}")
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.shape[-1] == 4:
            return to_rgb_array(Image.fromarray(image, mode="RGBA"))
        return np.ascontiguousarray(image)
    raise MediaError(f"an image must be a PIL image or a uint8 array, got {type(image).__name__}")


def _resize_normalize(rgb: np.ndarray, h: int, w: int, cfg: VisionPreprocessConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, h, w] resized (bicubic), rescaled and normalised."""
    from PIL import Image

    out = np.array(Image.fromarray(rgb).resize((w, h), resample=Image.BICUBIC))  # [h, w, 3]
    x = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(cfg.image_mean, dtype=np.float32)
    std = np.array(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))  # [3, h, w]


def _patchify(frames: np.ndarray, cfg: VisionPreprocessConfig) -> tuple[np.ndarray, tuple]:
    """frames [T, C, H, W] (T a multiple of temporal_patch) -> [T/tp*gh*gw, C*tp*p*p], grid."""
    T, C, H, W = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gt, gh, gw = T // tp, H // p, W // p
    x = frames.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, bh, bw, mh, mw, C, tp, ph, pw
    return np.ascontiguousarray(x.reshape(gt * gh * gw, C * tp * p * p)), (gt, gh, gw)


def preprocess_image(image, cfg: VisionPreprocessConfig) -> ProcessedMedia:
    rgb = to_rgb_array(image)
    H, W = rgb.shape[:2]
    h, w = smart_resize(H, W, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    x = _resize_normalize(rgb, h, w, cfg)  # [3, h, w]
    frames = np.broadcast_to(x[None], (cfg.temporal_patch_size, *x.shape))
    pv, grid = _patchify(np.ascontiguousarray(frames), cfg)
    return ProcessedMedia("image", pv, grid, content_hash=_hash("image", [rgb]))


def preprocess_video(
    frames, cfg: VisionPreprocessConfig, fps: float | None = None
) -> ProcessedMedia:
    """frames: a uint8 array [T, H, W, 3] or a list of images, already sampled."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if not isinstance(frames, (list, tuple)) or not frames:
        raise MediaError("a video must be a non-empty list of frames or a uint8 [T, H, W, 3] array")
    rgb = [to_rgb_array(f) for f in frames]
    H, W = rgb[0].shape[:2]
    if any(f.shape[:2] != (H, W) for f in rgb):
        raise MediaError("all frames of a video must have the same size")
    T, tp = len(rgb), cfg.temporal_patch_size
    h, w = smart_resize_video(T, H, W, cfg.factor, tp, cfg.video_min_pixels, cfg.video_max_pixels)
    x = np.stack([_resize_normalize(f, h, w, cfg) for f in rgb])  # [T, 3, h, w]
    if pad := -T % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    pv, grid = _patchify(x, cfg)
    ts = video_timestamps(T, fps or cfg.video_fps, tp)
    return ProcessedMedia("video", pv, grid, ts, _hash(f"video{ts}", rgb))


def _hash(kind: str, arrays: list[np.ndarray]) -> bytes:
    """Content hash of the decoded pixels (prefix caching keys image tokens by it)."""
    h = hashlib.blake2b(kind.encode(), digest_size=16)
    for a in arrays:
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


def video_timestamps(num_frames: int, fps: float, merge: int) -> tuple[float, ...]:
    """Seconds of each temporal patch: the mean of its first and last frame (Qwen3VLProcessor)."""
    idx = list(range(num_frames))
    if len(idx) % merge:
        idx.extend(idx[-1] for _ in range(merge - len(idx) % merge))
    ts = [i / fps for i in idx]
    return tuple((ts[i] + ts[i + merge - 1]) / 2 for i in range(0, len(ts), merge))
