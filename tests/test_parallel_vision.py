"""Images under tensor parallelism (issue 14): the vision tower is not split; rank 0 holds it,
encodes each step's images and sends the embeddings with the step, so 2 ranks give one
process's tokens for image prompts (chunked prefill through an image included) while the
worker holds the text model only."""

from __future__ import annotations

import json

from qwen35 import LLM, SamplingParams
from test_vision_model import PREPROCESSOR_JSON, rand_image
from tiny_vlm import IMAGE_ID, VEND_ID, VSTART_ID, save_vlm

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_images_on_two_ranks_equal_one_process(tmp_path):
    save_vlm(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_JSON))
    ids = [5, 6, VSTART_ID, IMAGE_ID, VEND_ID, 7, 8, 9]
    prompts = [
        {"prompt_token_ids": ids, "multi_modal_data": {"image": rand_image(90, 130, 0)}},
        {"prompt_token_ids": ids[:5], "multi_modal_data": {"image": rand_image(64, 96, 1)}},
        [5, 6, 7, 8],
    ]
    # 16-token steps: an image's 12 rows straddle prefill chunks
    opts = dict(dtype="fp32", max_num_seqs=4, max_model_len=256, block_size=8, verbose=False,
                max_num_batched_tokens=16)  # fmt: skip
    one = LLM(str(tmp_path), **opts)
    ref = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY)]
    two = LLM(str(tmp_path), tensor_parallel_size=2, **opts)
    try:
        assert two.engine.has_vision and two.engine.runner.vision is not None
        got = [o.outputs[0].token_ids for o in two.generate(prompts, GREEDY)]
        rows = two.engine.rank_memory
    finally:
        two.engine.shutdown()
    assert got == ref
    # rank 0 holds the tower on top of its text shard; the worker only its text shard
    tower = sum(p.numel() * 4 for p in one.engine.model.model.visual.parameters())
    assert rows[0]["weights_bytes"] - rows[1]["weights_bytes"] == tower
