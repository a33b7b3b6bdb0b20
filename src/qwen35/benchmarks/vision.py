"""Images in: vision-encoder images/s and time to first token of a chat with one image, ours vs
transformers on the same random weights, rounds interleaved.

A random vision tower is attached to the benchmark model for the run (and removed after); the
transformers peer is `Qwen3_5(Moe)ForConditionalGeneration` holding our very tensors. Encoder:
a batch of same-size images through `encode_vision` vs transformers' `model.visual`, from
preprocessed patches. TTFT: from the raw image to the first sampled token, each side with its
own preprocessing (ours: multimodal.processing; transformers: Qwen2VLImageProcessorPil) and a
prefix cache that cannot help (a new image every round).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from qwen35.benchmarks.common import BenchModel, BenchOptions, make_engine, median, ratio
from qwen35.request import SamplingParams


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"encoder_images": 2, "encoder_side": 224, "chat_side": 256,
                "rounds": opts.rounds or 1}  # fmt: skip
    return {"encoder_images": 4, "encoder_side": 448, "chat_side": 1024, "rounds": opts.rounds or 3}


def _attach_tower(bm: BenchModel, seed: int) -> None:
    from qwen35.loader import init_random_
    from qwen35.models.vision import VisionModel

    tower = VisionModel(bm.config.vision, bm.dtype, bm.device)
    init_random_({f"model.visual.{k}": v for k, v in tower.named_parameters()}, seed)
    bm.model.model.visual = tower


def _hf_vlm(bm: BenchModel):
    """transformers' ForConditionalGeneration holding our tensors (text + tower)."""
    import transformers as tf
    from transformers.utils import logging as hf_logging

    from qwen35.benchmarks.hf_baseline import hf_text_config

    hf_logging.set_verbosity_error()
    cfg, v = bm.config, bm.config.vision
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                  intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                  patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, in_channels=v.in_channels,
                  num_position_embeddings=v.num_position_embeddings)  # fmt: skip
    cls = tf.Qwen3_5MoeConfig if cfg.is_moe else tf.Qwen3_5Config
    hcfg = cls(text_config=hf_text_config(cfg).to_dict(), vision_config=vision,
               tie_word_embeddings=cfg.tie_word_embeddings)  # fmt: skip
    model_cls = (tf.Qwen3_5MoeForConditionalGeneration if cfg.is_moe
                 else tf.Qwen3_5ForConditionalGeneration)  # fmt: skip
    with torch.device("meta"):
        hf = model_cls(hcfg)
    state = {}
    for k, t in bm.model.state_dict().items():
        if k.startswith("model.") and not k.startswith("model.visual."):
            k = "model.language_model." + k[len("model.") :]
        state[k] = t
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    lm, vis = hf.model.language_model, hf.model.visual
    lm.rotary_emb = type(lm.rotary_emb)(config=hcfg.text_config).to(bm.device)
    vis.rotary_pos_emb = type(vis.rotary_pos_emb)(config=hcfg.vision_config).to(bm.device)
    return hf.eval()


def _image(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


@torch.inference_mode()
def run_vision(bm: BenchModel, opts: BenchOptions) -> dict:
    from qwen35.multimodal.processing import preprocess_image
    from qwen35.multimodal.sizing import VisionPreprocessConfig

    if bm.config.vision is None:
        raise ValueError(f"{bm.config.name} has no vision tower")
    sz = sizes(opts)
    _attach_tower(bm, opts.seed)
    try:
        hf = _hf_vlm(bm) if opts.baseline else None
        pre = VisionPreprocessConfig()
        # ---- encoder images/s, interleaved
        items = [preprocess_image(_image(sz["encoder_side"], i), pre)
                 for i in range(sz["encoder_images"])]  # fmt: skip
        px = torch.from_numpy(np.concatenate([it.pixel_values for it in items])).to(bm.device)
        grids = [it.grid for it in items]
        enc = {"ours": [], "transformers": []}
        bm.model.encode_vision(px[: grids[0][1] * grids[0][2]], grids[:1])  # warm-up, both
        if hf is not None:
            hf.model.visual(
                px[: grids[0][1] * grids[0][2]].to(bm.dtype), grid_thw=torch.tensor(grids[:1])
            )
        for r in range(sz["rounds"]):
            opts.say(f"vision encoder round {r + 1}/{sz['rounds']}")
            t0 = time.perf_counter()
            bm.model.encode_vision(px, grids)
            enc["ours"].append(time.perf_counter() - t0)
            if hf is not None:
                t0 = time.perf_counter()
                hf.model.visual(px.to(bm.dtype), grid_thw=torch.tensor(grids))
                enc["transformers"].append(time.perf_counter() - t0)
        # ---- TTFT of a chat with one image, interleaved
        engine = make_engine(bm, max_num_seqs=1, max_num_batched_tokens=8192,
                             enable_prefix_caching=False)  # fmt: skip
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe this image."}]}]  # fmt: skip
        prompt = engine.chat_template.render(msgs, enable_thinking=False)
        ttft = {"ours": [], "transformers": []}
        n_prompt = 0
        for r in range(-1, sz["rounds"]):  # round -1 warms both up and is not counted
            opts.say(f"vision TTFT round {r + 1}/{sz['rounds']}")
            img = _image(sz["chat_side"], 100 + r)
            t0 = time.perf_counter()
            engine.add_request(f"v{r}", {"prompt": prompt, "multi_modal_data": {"image": img}},
                               SamplingParams(max_tokens=1, temperature=0))  # fmt: skip
            while engine.has_unfinished_requests():
                for o in engine.step():
                    n_prompt = len(o.prompt_token_ids)
            took = time.perf_counter() - t0
            hf_took = _hf_ttft(hf, engine, prompt, img, pre) if hf is not None else None
            if r >= 0:
                ttft["ours"].append(took)
                if hf_took is not None:
                    ttft["transformers"].append(hf_took)
    finally:
        del bm.model.model.visual
    o_enc, h_enc = median(enc["ours"]), median(enc["transformers"])
    n = len(items)
    o_tt, h_tt = median(ttft["ours"]), median(ttft["transformers"])
    return {
        "encoder_images": n,
        "encoder_image_side": sz["encoder_side"],
        "chat_image_side": sz["chat_side"],
        "rounds": sz["rounds"],
        "prompt_tokens": n_prompt,
        "ours": {"encoder_images_per_s": n / o_enc, "ttft_s": o_tt},
        "transformers": {
            "encoder_images_per_s": n / h_enc if hf is not None else None,
            "ttft_s": h_tt if hf is not None else None,
        },
        "encoder_speedup": ratio(h_enc, o_enc) if hf is not None else None,
        "ttft_speedup": ratio(h_tt, o_tt) if hf is not None else None,
        "goals": [],
    }


def _hf_ttft(hf, engine, prompt: str, img: np.ndarray, pre) -> float:
    """transformers: its own image processor, then one forward of the whole prompt."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    proc = Qwen2VLImageProcessorPil(
        patch_size=pre.patch_size, merge_size=pre.merge_size,
        temporal_patch_size=pre.temporal_patch_size, image_mean=list(pre.image_mean),
        image_std=list(pre.image_std),
        size={"shortest_edge": pre.min_pixels, "longest_edge": pre.max_pixels},
    )  # fmt: skip
    vc = engine.config.vision
    t0 = time.perf_counter()
    out = proc(images=[Image.fromarray(img)], return_tensors="pt")
    grid = out["image_grid_thw"]
    n = int(grid.prod()) // (pre.merge_size**2)
    ids = engine.tokenizer.encode(prompt)
    k = ids.index(vc.image_token_id)
    ids = ids[:k] + [vc.image_token_id] * n + ids[k + 1 :]
    ids_t = torch.tensor([ids])
    logits = hf(input_ids=ids_t, pixel_values=out["pixel_values"], image_grid_thw=grid,
                mm_token_type_ids=(ids_t == vc.image_token_id).int(),
                logits_to_keep=1).logits  # fmt: skip
    int(logits[0, -1].argmax())
    return time.perf_counter() - t0
