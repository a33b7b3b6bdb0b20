"""The engine with images: greedy == transformers' generate, chunked prefill through an image,
batched == alone, prefix caching keyed by image content, text-only requests untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.errors import Qwen35Error
from test_vision_model import PREPROCESSOR_JSON, rand_image
from tiny_vlm import IMAGE_ID, VEND_ID, VSTART_ID, save_vlm

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
IDS = [5, 6, VSTART_ID, IMAGE_ID, VEND_ID, 7, 8, 9]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-engine")
    hf = save_vlm(d)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_JSON))
    return d, hf


@pytest.fixture(scope="module")
def llm(ckpt):
    return make_llm(ckpt[0])


def make_llm(d, **kw):
    opts = dict(dtype="fp32", max_num_seqs=4, max_model_len=512, block_size=8, verbose=False)
    return LLM(str(d), **{**opts, **kw})


def req(image, ids=IDS):
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}


def test_greedy_matches_transformers_generate(ckpt, llm):
    d, hf = ckpt
    assert llm.engine.has_vision
    img = rand_image(90, 130, 0)
    out = llm.generate(req(img), GREEDY)[0]
    mp = llm.engine.mm_processor.process(IDS, {"image": img})
    assert out.prompt_token_ids == mp.token_ids and len(mp.token_ids) == len(IDS) - 1 + 6 * 8 // 4
    ids = torch.tensor([mp.token_ids])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(mp.items[0].pixels),
            image_grid_thw=torch.tensor([mp.items[0].grid]),
            mm_token_type_ids=(ids == IMAGE_ID).int(), max_new_tokens=10, do_sample=False,
        )  # fmt: skip
    assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()


def test_chunked_prefill_splits_image_and_encodes_once(ckpt, llm):
    d, _ = ckpt
    img = rand_image(120, 120, 1)  # 4x4 merged = 16 image tokens
    whole = llm.generate(req(img), GREEDY)[0].outputs[0].token_ids
    small = make_llm(d, max_num_batched_tokens=5, enable_prefix_caching=False)
    assert small.generate(req(img), GREEDY)[0].outputs[0].token_ids == whole
    assert small.engine.runner.vision.num_encoded_items == 1
    assert not small.engine.runner.vision.cache  # freed once consumed
    # aborted while its image is half prefilled: its encoded image goes with it
    eng = small.engine
    eng.add_request("cut", req(img), GREEDY)
    eng.step()
    assert eng.runner.vision.cache and eng.request_tables().get("vision.cache")
    eng.abort_request("cut")
    assert not eng.request_tables(), eng.request_tables()


def test_batched_equals_alone_and_text_untouched(ckpt, llm):
    d, _ = ckpt
    reqs = [req(rand_image(90, 130, 2)), [5, 6, 7, 8, 9, 10, 11],
            req(rand_image(40, 200, 3), [4, VSTART_ID, IMAGE_ID, VEND_ID, 3])]  # fmt: skip
    alone = [llm.generate([r], GREEDY)[0].outputs[0].token_ids for r in reqs]
    # small encoder budget: the second image waits for a later step
    budget = make_llm(d, max_num_encoder_tokens=8)
    together = budget.generate(reqs, GREEDY)
    assert [o.outputs[0].token_ids for o in together] == alone
    # text only: the engine without the tower gives the same tokens and logprobs
    lp = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    llm.engine.scheduler.reset_prefix_cache()
    a = llm.generate([reqs[1]], lp)[0].outputs[0]
    b = make_llm(d, text_only=True).generate([reqs[1]], lp)[0].outputs[0]
    assert a.token_ids == b.token_ids and [x.logprob for x in a.logprobs] == [
        x.logprob for x in b.logprobs
    ]


def test_prefix_cache_hits_same_image_misses_other(llm):
    img = rand_image(90, 130, 4)
    first = llm.generate(req(img), GREEDY)[0]
    assert first.num_cached_tokens == 0
    same = llm.generate(req(img.copy()), GREEDY)[0]
    assert same.num_cached_tokens > 8 and same.outputs[0].token_ids == first.outputs[0].token_ids
    other = img.copy()
    other[50, 60, 1] ^= 0x40
    miss = llm.generate(req(other), GREEDY)[0]
    assert miss.num_cached_tokens == 0  # the image starts in the first block


def test_bad_media_and_text_only_engine(ckpt):
    d, _ = ckpt
    llm = make_llm(d, limit_mm_per_prompt={"image": 1, "video": 0})
    img = rand_image(64, 64, 5)
    with pytest.raises(Qwen35Error, match="at most 1"):
        llm.generate(req([img, img], IDS + [VSTART_ID, IMAGE_ID, VEND_ID]), GREEDY)
    with pytest.raises(Qwen35Error, match="placeholder"):
        llm.generate(req([img], [1, 2, 3]), GREEDY)
    with pytest.raises(Qwen35Error, match="not an image"):
        llm.generate(req("data:image/png;base64,aGVsbG8="), GREEDY)
    with pytest.raises(Qwen35Error, match="not allowed"):
        llm.generate(req("https://example.com/cat.png"), GREEDY)
    with pytest.raises(Qwen35Error, match="uint8"):
        llm.generate(req(np.zeros((8, 8, 3), np.float32)), GREEDY)
    assert not llm.engine.has_vision or llm.engine.scheduler.num_waiting == 0
    text = make_llm(d, limit_mm_per_prompt={"image": 0, "video": 0})
    assert not text.engine.has_vision and not text.engine.model.has_vision
    with pytest.raises(Qwen35Error, match="without a vision tower"):
        text.generate(req(img), GREEDY)


def test_video_timestamps_outside_the_vocabulary_are_refused(llm):
    """A video's frame timestamps are text the tokenizer encodes; this tiny model's 256-id
    vocabulary has no room for them (a tokenizer that does not match the checkpoint): the
    request is refused before it is queued, naming the cause, and the engine serves on (it
    failed the step's sequences with an IndexError from the embedding before)."""
    from tiny_vlm import VIDEO_ID

    video = np.random.default_rng(6).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ids = [5, VSTART_ID, VIDEO_ID, VEND_ID, 7]
    with pytest.raises(Qwen35Error, match="outside the model's vocabulary of 256"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"video": video}}, GREEDY)
    assert llm.engine.scheduler.num_waiting == 0 and not llm.engine.has_unfinished_requests()
    assert len(llm.generate(req(rand_image(64, 64, 7)), GREEDY)[0].outputs[0].token_ids) == 10


def test_checkpoint_without_tower_says_text_only(tmp_path):
    from safetensors.torch import load_file, save_file

    from qwen35.loader import CheckpointError, load_model
    from tiny import save_checkpoint

    save_checkpoint(tmp_path, hidden_size=32)
    f = tmp_path / "model.safetensors"
    sd = {k: v for k, v in load_file(str(f)).items() if not k.startswith("model.visual.")}
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="--text-only"):
        load_model(str(tmp_path), dtype="fp32", vision=True)
    assert not load_model(str(tmp_path), dtype="fp32").has_vision  # text only loads
    assert not load_model(str(tmp_path), dtype="fp32", vision="auto").has_vision
    assert not make_llm(tmp_path).engine.has_vision  # the engine's default: auto


def test_decode_after_an_image_takes_1d_positions(llm, monkeypatch):
    """Steps whose tokens all have three equal position streams (decoding after the image) get
    1-D positions p + rope_delta, which a decode CUDA graph can replay (the rotary is the same
    bit for bit: test_vision_model); the prefill step with the image keeps 3-D positions."""
    from qwen35.engine.vision_inputs import VisionInputs

    seen = []
    orig = VisionInputs.apply

    def apply(self, scheduled, batch):
        orig(self, scheduled, batch)
        seen.append((batch.num_tokens, batch.mrope_positions, batch.positions.clone()))

    monkeypatch.setattr(VisionInputs, "apply", apply)
    out = llm.generate(req(rand_image(90, 130, 1)), GREEDY)[0]
    n_prompt = len(out.prompt_token_ids)
    assert seen[0][1] is not None and seen[0][0] == n_prompt  # the image's prefill: 3-D
    decode = seen[1:]
    assert len(decode) == GREEDY.max_tokens - 1 and all(m is None for _, m, _ in decode)
    # p + rope_delta: the 12 image tokens (3 x 4 after the 2 x 2 merge) span 4 positions, so
    # the first generated token (p = n_prompt) sits at n_prompt - 8
    assert [int(p[0]) for _, _, p in decode] == list(range(n_prompt - 8, n_prompt - 8 + 9))


def test_prefix_cache_on_disk_keys_images_by_content(ckpt, tmp_path):
    """--prefix-cache-dir with an image in the prompt: a restarted engine takes the same image's
    prefix from disk (same tokens), never another image's."""
    img = rand_image(90, 130, 5)
    ids = IDS + list(range(10, 60))  # text after the image: blocks past it
    kw = dict(prefix_cache_dir=str(tmp_path), prefix_cache_dir_min_tokens=8)
    first = make_llm(ckpt[0], **kw)
    want = first.generate(req(img, ids), GREEDY)[0]
    first.engine.prefix_store.flush()
    later = make_llm(ckpt[0], **kw)
    got = later.generate(req(img.copy(), ids), GREEDY)[0]
    assert got.num_cached_tokens > 8 and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert later.engine.get_stats()["prefix_cache_disk_hits"] == 1
    other = img.copy()
    other[50, 60, 1] ^= 0x40
    assert later.generate(req(other, ids), GREEDY)[0].num_cached_tokens == 0
    assert later.engine.get_stats()["prefix_cache_disk_hits"] == 1
