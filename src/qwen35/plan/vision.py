"""`qwen35 plan --image WxH`: LM tokens per image and the vision encoder's working memory, from
`qwen35.multimodal.sizing` (the formulas the engine's preprocessing uses). No torch."""

from __future__ import annotations

import argparse

from qwen35.config import ModelConfig
from qwen35.multimodal.sizing import (
    MediaError,
    VisionPreprocessConfig,
    encoder_working_bytes,
    image_grid,
    num_tokens,
)


def image_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080)."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
        if w < 1 or h < 1:
            raise ValueError
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image size like 1920x1080") from None


def image_plans(cfgs: list[ModelConfig], sizes: list[tuple[int, int]], dtype_bytes: int = 2):
    """One dict per image size: grid, tokens, and per model the encoder's working bytes."""
    pre = VisionPreprocessConfig()
    out = []
    for w, h in sizes:
        try:
            grid = image_grid(w, h, pre)
        except MediaError as e:
            out.append({"size": f"{w}x{h}", "error": str(e)})
            continue
        t, gh, gw = grid
        row = {
            "size": f"{w}x{h}",
            "resized": f"{gw * pre.patch_size}x{gh * pre.patch_size}",
            "grid": list(grid),
            "tokens": num_tokens(grid, pre.merge_size),
            "encoder_working_bytes": {},
        }
        for cfg in cfgs:
            v = cfg.vision
            if v is None:
                continue
            row["encoder_working_bytes"][cfg.name] = encoder_working_bytes(
                t * gh * gw, v.hidden_size, v.intermediate_size, v.num_heads,
                v.out_hidden_size, dtype_bytes, v.spatial_merge_size,
            )  # fmt: skip
        out.append(row)
    return out


def render(plans: list[dict]) -> str:
    lines = ["", "Images (tokens per image; vision encoder working memory, BF16, one image):"]
    for p in plans:
        if "error" in p:
            lines.append(f"  {p['size']}: {p['error']}")
            continue
        mem = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in p["encoder_working_bytes"].items())
        lines.append(
            f"  {p['size']} -> {p['resized']} px, grid {p['grid'][1]}x{p['grid'][2]} patches, "
            f"{p['tokens']} tokens; encoder {mem or 'n/a (no vision tower)'}"
        )
    return "\n".join(lines)
