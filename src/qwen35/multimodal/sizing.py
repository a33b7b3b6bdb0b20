"""Grid sizes, token counts and encoder memory of images and videos: one formula, no torch.

The engine's preprocessing and the planner (`qwen35 plan --image WxH`) both call these, so the
tokens a plan prints are the tokens a request costs. The resize rules are transformers'
`smart_resize` of the Qwen2-VL image processor and of the Qwen3-VL video processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen35.errors import Qwen35Error


class MediaError(Qwen35Error, ValueError):
    """An image or video that cannot be used; the message says what was wrong (a 400)."""


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """The processor constants (an official preprocessor_config.json overrides them)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65_536  # image size.shortest_edge
    max_pixels: int = 16_777_216  # image size.longest_edge
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_min_pixels: int = 128 * 32 * 32  # Qwen3VLVideoProcessor size.shortest_edge
    video_max_pixels: int = 32 * 32 * 768  # its size.longest_edge
    video_fps: float = 24.0  # timestamps of frames given without a frame rate (as transformers)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """(h, w) multiples of `factor`, within [min_pixels, max_pixels], aspect kept (Qwen2-VL)."""
    if min(height, width) < 1:
        raise MediaError(f"an image of {width}x{height} pixels has no area")
    if max(height, width) / min(height, width) > 200:
        raise MediaError(
            f"an image of {width}x{height} pixels has an aspect ratio over 200: crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
    min_pixels: int, max_pixels: int,
):  # fmt: skip
    """The Qwen3-VL video processor's resize: the pixel budget covers all frames."""
    if num_frames < temporal_factor:  # as transformers' video processor
        raise MediaError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"video frames of {width}x{height} have an aspect ratio over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(width: int, height: int, cfg: VisionPreprocessConfig | None = None):
    """Patch grid (t, h, w) of one image of width x height pixels."""
    cfg = cfg or VisionPreprocessConfig()
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def video_grid(num_frames: int, width: int, height: int, cfg: VisionPreprocessConfig | None = None):
    """Patch grid (t, h, w) of a video of num_frames frames (frames padded to pairs)."""
    cfg = cfg or VisionPreprocessConfig()
    h, w = smart_resize_video(
        num_frames, height, width, cfg.factor, cfg.temporal_patch_size,
        cfg.video_min_pixels, cfg.video_max_pixels,
    )  # fmt: skip
    t = -(-num_frames // cfg.temporal_patch_size)
    return t, h // cfg.patch_size, w // cfg.patch_size


def num_tokens(grid: tuple[int, int, int], merge_size: int = 2) -> int:
    """LM tokens of one image / video: one per merge x merge patches (per temporal step)."""
    t, h, w = grid
    return t * h * w // (merge_size * merge_size)


def encoder_working_bytes(
    num_patches: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    out_hidden_size: int,
    dtype_bytes: int = 2,
    merge_size: int = 2,
) -> int:
    """Peak temporaries of one encoder call over num_patches patches (models/vision.py): the
    residual stream, the normed input, qkv [N, 3D], attention output, the MLP's [N, I] hidden,
    rotary cos/sin in fp32, and the merger's [N/4, 4D] input, hidden and output. SDPA's flash
    kernels (CPU and CUDA) tile the L x L scores, so they are not counted."""
    n, d = num_patches, hidden_size
    act = n * (d + d + 3 * d + d + max(intermediate_size, 3 * d)) * dtype_bytes
    rope = 2 * n * (d // num_heads) * 4
    merged = n // (merge_size * merge_size)
    merger = merged * (2 * merge_size * merge_size * d + out_hidden_size) * dtype_bytes
    return act + rope + merger


def max_encoder_patches(encoder_tokens: int, cfg: VisionPreprocessConfig | None = None) -> int:
    """Most patches one step encodes: the token budget, or the largest single image (the first
    item of a step is always encoded)."""
    cfg = cfg or VisionPreprocessConfig()
    largest = cfg.max_pixels // (cfg.patch_size * cfg.patch_size)
    return max(encoder_tokens * cfg.merge_size * cfg.merge_size, largest)
