"""What the engine needs to take images: the processor it builds at start, and the split of a
vLLM-style prompt dict into its text and its media."""

from __future__ import annotations

from qwen35.multimodal.sizing import MediaError

DEFAULT_LIMIT = 16  # images (and videos) per prompt unless limit_mm_per_prompt says otherwise


def make_mm_processor(model, model_dir, tokenizer, mm_config):
    """A MultimodalProcessor when the model has a vision tower (else None)."""
    if not getattr(model, "has_vision", False):
        return None
    from qwen35.multimodal.inputs import MultimodalProcessor
    from qwen35.multimodal.media import MediaOptions
    from qwen35.multimodal.processing import load_preprocess_config

    limits = {"image": DEFAULT_LIMIT, "video": DEFAULT_LIMIT}
    limits.update(mm_config.limit_mm_per_prompt or {})
    domains = tuple(
        d.strip().lower() for d in (mm_config.allowed_media_domains or "").split(",") if d.strip()
    )
    media = MediaOptions(
        allowed_domains=domains,
        max_bytes=mm_config.max_media_bytes,
        timeout_s=mm_config.media_fetch_timeout,
    )
    return MultimodalProcessor(
        model.config.vision, load_preprocess_config(model_dir), tokenizer.encode, limits, media
    )


def encoder_working_memory(model, model_dir, config) -> int:
    """Bytes the vision encoder's temporaries need in one step (0 without a tower): the
    planner's formula at the most patches a step encodes."""
    if not getattr(model, "has_vision", False):
        return 0
    from qwen35.multimodal.processing import load_preprocess_config
    from qwen35.multimodal.sizing import encoder_working_bytes, max_encoder_patches

    v = model.config.vision
    budget = config.multimodal.max_num_encoder_tokens or config.scheduler.max_num_batched_tokens
    patches = max_encoder_patches(budget, load_preprocess_config(model_dir))
    dtype_bytes = next(model.parameters()).element_size()
    return encoder_working_bytes(patches, v.hidden_size, v.intermediate_size, v.num_heads,
                                 v.out_hidden_size, dtype_bytes, v.spatial_merge_size)  # fmt: skip


def split_mm_prompt(prompt, multi_modal_data):
    """{"prompt" | "prompt_token_ids": ..., "multi_modal_data": ...} -> (prompt, media)."""
    if isinstance(prompt, dict):
        extra = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
        if extra or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise MediaError(
                "a prompt dict needs exactly one of 'prompt' / 'prompt_token_ids', and may have "
                f"'multi_modal_data' (got keys {sorted(prompt)})"
            )
        text = prompt.get("prompt", prompt.get("prompt_token_ids"))
        return text, prompt.get("multi_modal_data") or multi_modal_data
    return prompt, multi_modal_data
