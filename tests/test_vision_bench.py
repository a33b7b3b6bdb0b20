"""`qwen35 bench --workload vision --quick` on a tiny random VLM config: it runs both sides and
the document is consistent. No timings asserted."""

from __future__ import annotations

import json
import math

from qwen35.benchmarks.common import BenchOptions
from qwen35.benchmarks.runner import run_bench
from tiny_vlm import hf_vlm


def test_vision_workload(tmp_path):
    cfg = hf_vlm().config.to_dict()
    cfg["text_config"]["vocab_size"] = 248320  # the chat prompt comes from the real tokenizer
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        cfg.pop(k)  # the official ids
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    opts = BenchOptions(model=str(tmp_path / "config.json"), quick=True, dtype="fp32")
    doc = run_bench(opts, ["vision"])
    v = doc["workloads"]["vision"]
    assert v["encoder_images"] == 2 and v["rounds"] == 1
    assert v["prompt_tokens"] > 64  # the 256x256 image alone is 64 tokens
    for side in ("ours", "transformers"):
        for key in ("encoder_images_per_s", "ttft_s"):
            assert math.isfinite(v[side][key]) and v[side][key] > 0
    assert v["encoder_speedup"] > 0 and v["ttft_speedup"] > 0
