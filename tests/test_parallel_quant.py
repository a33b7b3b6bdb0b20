"""Quantized weights under tensor / expert parallelism (issue 14): an FP8 checkpoint's weights and
128x128 block scales read per rank (whole blocks), random FP8 weights, int8 / int4 quantized on
each rank's shard; 2 ranks (gloo) against one process; a layout that would cut an FP8 block is
refused, with the reason, before any weight is read; each rank holds the planner's bytes."""

from __future__ import annotations

import pytest
import torch

from qwen35.engine.llm_engine import LLM
from qwen35.loader import load_model
from qwen35.parallel import TensorParallel
from qwen35.plan.sharding import LayoutError, rank_weights
from test_parallel_engine import assert_rank_memory_is_planned, run
from test_parallel_shard import expected_shard
from tiny import save_checkpoint, save_fp8_checkpoint

# every split dimension is whole 128-blocks per rank at tp=2 (q 512 rows, o_proj 256 columns,
# DeltaNet q|k|v 256|256|256, MLP / experts 256); one KV head of 128 is replicated; hidden 200
# leaves partial blocks in the dimension that is not split
FP8_TP = dict(hidden_size=200, num_attention_heads=2, head_dim=128, num_key_value_heads=1,
              linear_num_key_heads=2, linear_key_head_dim=128, linear_num_value_heads=4,
              linear_value_head_dim=64, intermediate_size=256, moe_intermediate_size=256,
              shared_expert_intermediate_size=256, num_experts=4)  # fmt: skip


def _pair(tmp_path_factory, moe: bool, experts: str):
    base = tmp_path_factory.mktemp("fp8-moe" if moe else "fp8-dense")
    kw = {k: v for k, v in FP8_TP.items() if moe or k in _DENSE_KEYS}
    save_fp8_checkpoint(base / "fp8", base / "bf16", moe=moe, experts=experts, **kw)
    return base / "fp8", base / "bf16"


_DENSE_KEYS = set(FP8_TP) - {"moe_intermediate_size", "shared_expert_intermediate_size",
                             "num_experts"}  # fmt: skip


@pytest.fixture(scope="module")
def fp8_dense(tmp_path_factory):
    return _pair(tmp_path_factory, False, "fused")


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory):
    return _pair(tmp_path_factory, True, "per_expert")


@pytest.mark.parametrize(
    "which,ep",
    [("dense", False), ("moe", True), pytest.param("moe", False, marks=pytest.mark.slow)],
)
def test_fp8_two_ranks_equal_one_process(which, ep, fp8_dense, fp8_moe):
    d = (fp8_dense if which == "dense" else fp8_moe)[0]
    # fp32 K/V: under the bf16 cache --kv-cache-dtype auto gives FP8 weights, a rounding of
    # K / V flips on fp32-level differences between one and two ranks' sums (~2e-5 in logits)
    kv = dict(kv_cache_dtype="fp32")
    ref_tokens, ref_logits, _ = run(d, head_screen=False, **kv)  # every step's logits
    tokens, logits, stats = run(d, tensor_parallel_size=2, enable_expert_parallel=ep, **kv)
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits, strict=False):  # fp32 compute on the same FP8 values
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0


@pytest.mark.parametrize("moe,ep", [(False, False), (True, True), (True, False)])
def test_each_rank_reads_whole_fp8_blocks_of_its_slices(moe, ep, fp8_dense, fp8_moe):
    """A rank's FP8 modules dequantise to exactly its slices of the full dequantised weights
    (so weights and scales were both sliced right), from a sliced read."""
    from qwen35.quant.layers import Fp8Experts, Fp8Linear

    d = (fp8_moe if moe else fp8_dense)[0]
    full = load_model(d, dtype="fp32")
    mods, cfg = dict(full.named_modules()), full.config
    f32 = torch.float32
    for rank in range(2):
        tp = TensorParallel(rank, 2, ep)
        shard = load_model(d, dtype="fp32", tp=tp)
        n = 0
        for name, m in shard.named_modules():
            if isinstance(m, Fp8Linear):
                want = expected_shard(mods[name].dequantized(f32), f"{name}.weight", cfg, tp)
                assert torch.equal(m.dequantized(f32), want), name
                n += 1
            elif isinstance(m, Fp8Experts):
                ours, theirs = m.dequantized(f32), mods[name].dequantized(f32)
                for got, ref, leaf in zip(ours, theirs, ("gate_up", "down"), strict=True):
                    want = expected_shard(ref, f"{name}.{leaf}_proj", cfg, tp)
                    assert torch.equal(got, want), name
                n += 1
        assert n >= 13  # every FP8 module of the 4 layers
        assert shard.load_report.num_bytes < 0.6 * full.load_report.num_bytes


def test_fp8_rank_memory_equals_the_planners_per_gpu_figures(fp8_moe):
    """A real FP8 checkpoint (TP=2 + EP=2) and random FP8 weights from its config (TP=2)."""
    d = fp8_moe[0]
    for ep, fmt in ((True, "auto"), (False, "random")):
        llm = LLM(str(d), tensor_parallel_size=2, enable_expert_parallel=ep, dtype="bf16",
                  load_format=fmt, verbose=False, num_kv_blocks=8, text_only=True)  # fmt: skip
        rows = llm.engine.rank_memory
        llm.engine.shutdown()
        assert_rank_memory_is_planned(rows, d, "fp8", ep)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_quantized_shards_hold_the_planners_bytes(fmt, fp8_dense):
    """Quantizing each rank's shard at load gives the planner's per-GPU weight bytes (int4's
    group choice on the shard's shape included); random FP8 is drawn directly in FP8."""
    bf16 = fp8_dense[1]
    cfg = load_model(bf16, dtype="bf16", load_format="random").config
    plan = rank_weights(cfg, fmt, tp=2, text_only=True).total
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        for load_format in ("auto", "random") if fmt == "fp8" else ("auto",):
            m = load_model(bf16, dtype="bf16", tp=tp, quantization=fmt, load_format=load_format)
            got = sum(p.numel() * p.element_size() for p in m.parameters())
            assert abs(got - plan) <= 0.01 * plan, (fmt, rank, load_format, got, plan)
            assert getattr(m, "quantization", fmt) == fmt


def test_int8_two_ranks_close_to_one_process(tmp_path):
    d = tmp_path / "m"
    save_checkpoint(d, num_key_value_heads=1, vocab_size=257)
    ref_tokens, ref_logits, _ = run(d, quantization="int8")
    tokens, logits, _ = run(d, tensor_parallel_size=2, quantization="int8")
    # row-parallel projections get per-row scales over each rank's input columns, so the
    # weights differ slightly from one process's; the logits stay within a fraction of a percent
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits, strict=False):
        assert ((a - b).norm() / b.norm()).item() < 0.02


def test_layout_that_cuts_fp8_blocks_is_refused_before_reading(tmp_path):
    fp8, bf16 = tmp_path / "fp8", tmp_path / "bf16"
    save_fp8_checkpoint(fp8, bf16, moe=False, experts="fused",
                        **{**{k: FP8_TP[k] for k in _DENSE_KEYS}, "intermediate_size": 192})  # fmt: skip
    (fp8 / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    why = r"mlp.gate_proj, mlp.up_proj: 192 rows split 2 ways give 96 per rank, not whole " \
          r"128-wide FP8 scale blocks"  # fmt: skip
    with pytest.raises(LayoutError, match=why):
        LLM(str(fp8), tensor_parallel_size=2, dtype="fp32", verbose=False)
    with pytest.raises(LayoutError, match=why):
        load_model(fp8, tp=TensorParallel(1, 2))
    # FP8 made at load from BF16 follows the same rule; int8 has no blocks to keep whole
    with pytest.raises(LayoutError, match="mlp.down_proj: 192 input columns"):
        load_model(bf16, tp=TensorParallel(0, 2), quantization="fp8")
    load_model(bf16, tp=TensorParallel(0, 2), quantization="int8")


def test_kv_heads_must_be_whole_fp8_blocks_per_rank():
    from qwen35.config import ModelConfig
    from qwen35.plan.sharding import layout_problems
    from tiny import tiny_config_dict

    cfg = ModelConfig.from_hf(
        tiny_config_dict(model_type="qwen3_5_text",
                         **{**{k: FP8_TP[k] for k in _DENSE_KEYS}, "head_dim": 64,
                            "num_attention_heads": 4})
    )  # fmt: skip
    (why,) = layout_problems(cfg, 2, 1, "fp8")
    assert "self_attn.k_proj, self_attn.v_proj: 1 KV heads of 64 over 2 ranks give 64 rows" in why
    assert not layout_problems(cfg, 2, 1, "bf16")


def test_bf16_storage_two_ranks_equal_one_process(tmp_path):
    """fp32 compute on bf16-stored weights (`--quantization bf16`, what `--dtype auto` picks on
    CPUs without native bf16) on 2 ranks: each rank's shard read into bf16 as stored, the
    tokens of one fp32 process."""
    d = tmp_path / "m"
    save_checkpoint(d, moe=True, dtype=torch.bfloat16, num_key_value_heads=1, vocab_size=257)
    ref_tokens, ref_logits, _ = run(d)
    tokens, logits, _ = run(d, tensor_parallel_size=2, quantization="bf16")
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits, strict=False):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
