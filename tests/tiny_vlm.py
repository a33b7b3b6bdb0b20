"""Tiny random Qwen 3.5 vision-language checkpoints built and saved by transformers (the oracle).

`hf_vlm(moe)` is a `Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration` in
fp32 with random weights (norms and biases randomised too, so no parameter is a no-op), odd
vision sizes (width 40, head_dim 20, MLP 72, a 10x10 position table) and the vision token ids
moved inside the tiny vocabulary. `save_vlm(dir, moe)` writes it with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import random_model, randomise_text_param, tiny_config_dict

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 250, 251, 252, 253

VISION = dict(
    depth=2,
    hidden_size=40,
    num_heads=2,
    intermediate_size=72,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    in_channels=3,
    num_position_embeddings=100,
)


def hf_vlm(moe: bool = False, seed: int = 0, **text_overrides):
    import transformers as tf

    text = tiny_config_dict(moe, **text_overrides)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [3, 3, 2]}
    cfg_cls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
    model_cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
    config = cfg_cls(
        text_config=text,
        vision_config={**VISION, "out_hidden_size": text["hidden_size"]},
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    if moe:
        config.text_config._experts_implementation = "eager"
    return random_model(model_cls, config, seed, _randomise)


def _randomise(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    """Vision biases and norms around their identity values, other vision weights small; the
    language model's parameters as in tiny.py."""
    if "visual" in name and (name.endswith("bias") or "norm" in name):
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 + base)
    elif "visual" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    else:
        randomise_text_param(name, p, g)


def save_vlm(path: Path, moe: bool = False, seed: int = 0, **text_overrides):
    """save_pretrained of a tiny VLM (official layout); returns the transformers model."""
    model = hf_vlm(moe, seed, **text_overrides)
    model.save_pretrained(str(path))
    return model
