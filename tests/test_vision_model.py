"""The vision tower and the full model with images / videos against transformers'
Qwen3_5(Moe)ForConditionalGeneration on tiny random checkpoints written by save_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen35.engine.forward_batch import allocate_caches
from qwen35.loader import load_model
from qwen35.models.qwen3_5 import uncached_batch
from qwen35.multimodal.inputs import MultimodalProcessor
from qwen35.multimodal.media import MediaOptions
from qwen35.multimodal.sizing import VisionPreprocessConfig
from tiny_vlm import IMAGE_ID, VEND_ID, VIDEO_ID, VSTART_ID, save_vlm

# small images: min 4, max 64 merged tokens per image (the tiny checkpoints' preprocessing)
PRE = VisionPreprocessConfig(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
                             video_min_pixels=32 * 32 * 4, video_max_pixels=32 * 32 * 96)  # fmt: skip
PREPROCESSOR_JSON = {
    "size": {"shortest_edge": PRE.min_pixels, "longest_edge": PRE.max_pixels},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}  # fmt: skip


def rand_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(
    scope="module",
    params=[False, pytest.param(True, marks=pytest.mark.slow)],  # MoE: same tower, slower LM
    ids=["dense", "moe"],
)
def vlm(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-moe" if request.param else "vlm")
    hf = save_vlm(d, moe=request.param)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_JSON))
    ours = load_model(str(d), dtype="fp32", vision=True)
    return d, hf, ours


def processor(model) -> MultimodalProcessor:
    # timestamps of video frames as made-up ids inside the tiny vocabulary
    return MultimodalProcessor(model.config.vision, PRE, lambda s: [ord(c) % 200 + 10 for c in s],
                               {"image": 4, "video": 2}, MediaOptions())  # fmt: skip


def our_logits(model, mp) -> torch.Tensor:
    T = len(mp.token_ids)
    batch = uncached_batch(1, T, "cpu")
    batch.mrope_positions = torch.from_numpy(mp.mrope)
    rows, embs = [], []
    for it in mp.items:
        e = model.encode_vision(torch.from_numpy(it.pixels), [it.grid])
        k = 0
        for off, n in it.segments:
            rows += range(off, off + n)
            embs.append(e[k : k + n])
            k += n
    batch.mm_rows, batch.mm_embeds = torch.tensor(rows), torch.cat(embs)
    caches = allocate_caches(model.config, 1, T, 1, torch.float32, "cpu")
    return model(torch.tensor(mp.token_ids), batch, caches)


def hf_logits(hf, mp) -> torch.Tensor:
    ids = torch.tensor([mp.token_ids])
    types = torch.zeros_like(ids)
    types[ids == IMAGE_ID], types[ids == VIDEO_ID] = 1, 2
    kw = {}
    for kind, pv, grid in (("image", "pixel_values", "image_grid_thw"),
                           ("video", "pixel_values_videos", "video_grid_thw")):  # fmt: skip
        items = [it for it in mp.items if it.kind == kind]
        if items:
            kw[pv] = torch.from_numpy(np.concatenate([it.pixels for it in items]))
            kw[grid] = torch.tensor([it.grid for it in items])
    with torch.no_grad():
        return hf(input_ids=ids, mm_token_type_ids=types, **kw).logits[0]


def test_encoder_matches_transformers(vlm):
    _, hf, ours = vlm
    grids = [(1, 4, 6), (2, 8, 4), (1, 22, 18), (1, 2, 2)]  # incl. a 2-frame video, odd sizes
    n = sum(t * h * w for t, h, w in grids)
    px = torch.randn(n, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(px, grid_thw=torch.tensor(grids)).pooler_output
    got = ours.encode_vision(px, grids)
    assert got.shape == ref.shape == (n // 4, ours.config.hidden_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "media",
    [
        {"image": [(90, 130)]},
        {"image": [(200, 60), (33, 300)]},  # two images of different sizes
        {"image": [(64, 64)], "video": [(3, 64, 96)]},  # odd frame count: last frame repeated
    ],
    ids=["one-image", "two-images", "image+video"],
)
def test_logits_match_transformers(vlm, media):
    _, hf, ours = vlm
    images = [rand_image(h, w, i) for i, (h, w) in enumerate(media.get("image", []))]
    videos = [[rand_image(h, w, 10 + f) for f in range(t)] for t, h, w in media.get("video", [])]
    ids = [5, 6]
    for _ in images:
        ids += [VSTART_ID, IMAGE_ID, VEND_ID, 7]
    for _ in videos:
        ids += [VSTART_ID, VIDEO_ID, VEND_ID, 8]
    ids += [9, 11, 12]
    mp = processor(ours).process(ids, {"image": images, "video": videos})
    assert len(mp.items) == len(images) + len(videos)
    if videos:  # timestamps between frames; every frame its own positions
        assert len(mp.items[-1].segments) == mp.items[-1].grid[0]
    got, ref = our_logits(ours, mp), hf_logits(hf, mp)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the positions too are transformers' get_rope_index
    ids_t = torch.tensor([mp.token_ids])
    types = (ids_t == IMAGE_ID).int() + 2 * (ids_t == VIDEO_ID).int()
    img = [it.grid for it in mp.items if it.kind == "image"] or None
    vid = [it.grid for it in mp.items if it.kind == "video"] or None
    pos, delta = hf.model.get_rope_index(ids_t, types, img and torch.tensor(img),
                                         vid and torch.tensor(vid))  # fmt: skip
    assert np.array_equal(pos[:, 0].numpy(), mp.mrope) and int(delta) == mp.rope_delta


def test_text_only_model_is_bit_identical_with_and_without_tower(vlm):
    d, _, ours = vlm
    text_only = load_model(str(d), dtype="fp32")
    assert not text_only.has_vision and ours.has_vision
    ids = torch.randint(0, 250, (2, 37), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours(ids), text_only(ids))
    # and the 3-D path with three equal streams is bit for bit the 1-D rotary
    pos = torch.arange(300)
    c1, s1 = ours.rotary.cos_sin(pos, torch.float32)
    c3, s3 = ours.rotary.cos_sin_mrope(pos.expand(3, -1), torch.float32)
    assert torch.equal(c1, c3) and torch.equal(s1, s3)


def test_encoder_bf16_close_to_transformers(vlm):
    import copy

    d, hf, _ = vlm
    ours = load_model(str(d), dtype="bf16", vision=True)
    ref_tower = copy.deepcopy(hf.model.visual).to(torch.bfloat16)
    grids = [(1, 4, 6), (2, 8, 4), (1, 22, 18)]
    n = sum(t * h * w for t, h, w in grids)
    px = torch.randn(n, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_tower(px.to(torch.bfloat16), grid_thw=torch.tensor(grids)).pooler_output
    got = ours.encode_vision(px, grids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=0)  # ~1 bf16 ulp
