"""Tensor parallelism on the CPU at a mid size: `qwen35 bench --workload tp` on a random config.

    python bench/tensor_parallel.py [--hidden 1024] [--layers 8] [-tp 2] [other bench flags]

Writes the config.json of a mid-size Qwen 3.5 text model (hidden 1024, 8 layers, vocabulary
32000: 175M parameters) to a temporary directory and runs `qwen35 bench --workload tp --model
<it>` with the remaining arguments (e.g. --rounds, --dtype, --quick, --json, --out): one process
vs N ranks on the same random weights, interleaved (qwen35/benchmarks/parallel.py); with
--draft-tokens K also both with K MTP drafts a step (the config has an MTP head, loaded only then).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def config(hidden: int, layers: int) -> dict:
    return {
        "model_type": "qwen3_5_text", "vocab_size": 32000, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 128, "linear_num_key_heads": 8, "linear_num_value_heads": 16,
        "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4,
        "intermediate_size": 3 * hidden, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "eos_token_id": 1, "mtp_num_hidden_layers": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0,
                            "partial_rotary_factor": 0.25},
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    args, rest = ap.parse_known_args()
    from qwen35.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config(args.hidden, args.layers)))
        return cli(["bench", "--workload", "tp", "--model", str(path), *rest])


if __name__ == "__main__":
    sys.exit(main())
