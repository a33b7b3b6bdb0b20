"""Tensor-parallel loading without processes (issue 14): each rank's shard is exactly its
slices of the full weights (heads, q|k|v parts, gate|up parts, experts, padded vocabulary,
replicated KV heads), read with sliced reads; impossible layouts are refused before any read."""

from __future__ import annotations

import pytest
import torch

from qwen35.config import ModelConfig
from qwen35.engine.llm_engine import LLM
from qwen35.loader import load_model
from qwen35.parallel import TensorParallel
from qwen35.parallel.shard import copies, local_shape, shard_rule
from qwen35.plan.sharding import LayoutError
from tiny import save_checkpoint


def expected_shard(full: torch.Tensor, name: str, cfg, tp: TensorParallel) -> torch.Tensor:
    """The rank's tensor built from the full one with the planner-matching rule."""
    rule = shard_rule(name, tuple(full.shape), cfg, tp.rank, tp.size, tp.expert_parallel)
    if rule is None:
        return full
    out = torch.zeros(local_shape(rule, tuple(full.shape), name, tp.size), dtype=full.dtype)
    parts = torch.cat([full.narrow(rule.dim, s, n) for s, n in rule.pieces], dim=rule.dim)
    out.narrow(rule.dim, 0, parts.shape[rule.dim]).copy_(parts)
    return out


@pytest.mark.parametrize(
    "moe,ep,experts",
    [(False, False, "fused"), (True, False, "per_expert"), (True, True, "per_expert"),
     (True, True, "fused")],
)  # fmt: skip
def test_each_rank_holds_exactly_its_slices(tmp_path, moe, ep, experts):
    # 1 KV head (replicated on both ranks), 257 tokens (the vocabulary pads to 2 x 129)
    d = tmp_path / "m"
    save_checkpoint(d, moe=moe, experts=experts, num_key_value_heads=1, vocab_size=257,
                    tie_word_embeddings=moe)  # fmt: skip
    full = load_model(d, dtype="fp32")
    cfg = full.config
    fparams = dict(full.named_parameters())
    for rank in range(2):
        tp = TensorParallel(rank, 2, ep)
        shard = load_model(d, dtype="fp32", tp=tp)
        for name, p in shard.named_parameters():
            want = expected_shard(fparams[name], name, cfg, tp)
            assert p.shape == want.shape, name
            assert torch.equal(p, want), name
        # sliced reads: a rank reads about half the checkpoint, not all of it
        assert shard.load_report.num_bytes < 0.6 * full.load_report.num_bytes
    k0 = dict(load_model(d, dtype="fp32", tp=TensorParallel(0, 2)).named_parameters())
    name = "model.layers.3.self_attn.k_proj.weight"
    assert torch.equal(k0[name], fparams[name])  # the one KV head on every rank


def test_copies_intersect_regions():
    # in_proj_qkv-like rule: rank 1 of 2 over parts (4, 4, 8)
    rule = shard_rule("model.layers.0.linear_attn.in_proj_qkv.weight", (16, 3), _cfg(), 1, 2)
    assert rule.pieces == ((2, 2), (6, 2), (12, 4))
    got = copies(rule, [(0, 16, True), (0, 3, True)])
    assert [c[1][0] for c in got] == [slice(0, 2), slice(2, 4), slice(4, 8)]
    # one expert's up half of a fused [E, 2I, H] parameter, rank 0, tensor-parallel
    rule = shard_rule("model.layers.0.mlp.experts.gate_up_proj", (4, 8, 3), _cfg(), 0, 2)
    ((src, dst),) = copies(rule, [(2, 3, False), (4, 8, True), (0, 3, True)])
    assert src == (slice(0, 2), slice(None)) and dst == (2, slice(2, 4), slice(0, 3))
    # expert parallelism: expert 1 is not on rank 1 of 2 (experts 2, 3 are)
    rule = shard_rule("model.layers.0.mlp.experts.down_proj", (4, 3, 8), _cfg(), 1, 2, ep=True)
    assert copies(rule, [(1, 2, False), (0, 3, True), (0, 8, True)]) == []


def _cfg() -> ModelConfig:
    from tiny import tiny_config_dict

    return ModelConfig.from_hf(
        tiny_config_dict(
            model_type="qwen3_5_text",
            linear_num_key_heads=2,
            linear_key_head_dim=2,
            linear_value_head_dim=2,
        )
    )


def test_impossible_layout_refused_before_reading(tmp_path):
    d = tmp_path / "m"
    save_checkpoint(d)  # 4 attention heads, 2 KV heads, DeltaNet 2 key / 4 value heads
    (d / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    with pytest.raises(LayoutError, match="tp=3 does not divide the 4 attention heads"):
        LLM(str(d), tensor_parallel_size=3, dtype="fp32", verbose=False)
    with pytest.raises(LayoutError, match="expert parallelism needs an MoE model"):
        load_model(d, tp=TensorParallel(0, 2, expert_parallel=True))


def test_random_weights_agree_where_replicated(tmp_path):
    d = tmp_path / "m"
    save_checkpoint(d, moe=True)  # only its config.json is read with load_format="random"
    ranks = [
        dict(load_model(d, dtype="fp32", load_format="random", tp=TensorParallel(r, 2))
             .named_parameters())
        for r in range(2)
    ]  # fmt: skip
    router = "model.layers.0.mlp.gate.weight"
    assert torch.equal(ranks[0][router], ranks[1][router])  # every rank routes alike
    assert ranks[0][router].std() > 0


def test_cli_flags():
    import argparse

    from qwen35.engine.config import EngineConfig

    p = argparse.ArgumentParser()
    EngineConfig.add_cli_arguments(p)
    args = p.parse_args(["--model", "m", "-tp", "2", "--enable-expert-parallel"])
    ec = EngineConfig.from_cli(args)
    assert ec.parallel.tensor_parallel_size == 2 and ec.parallel.enable_expert_parallel
    long = p.parse_args(["--model", "m", "--tensor-parallel-size", "4"])
    assert EngineConfig.from_cli(long).parallel.tensor_parallel_size == 4
