"""The planner's arithmetic: parameter counts and weight bytes against the article and against
transformers, cache bytes against arithmetic written out here, TP/FP8 layout rules, memory fits,
the decode roofline and recommendations."""

from __future__ import annotations

import dataclasses
import math

import pytest

from qwen35 import catalog
from qwen35.cache_spec import cache_spec
from qwen35.catalog.gpus import GpuSpec, custom_gpu, gpu_names, load_gpu
from qwen35.config import ModelConfig
from qwen35.plan.params import (
    fp8_block_scales,
    param_counts,
    tensor_bytes,
    text_tensors,
    weight_bytes,
    weight_tensors,
)
from qwen35.plan.planner import (
    GIB,
    Deployment,
    PlanError,
    decode_step_bytes,
    decode_tokens_per_s,
    max_concurrency,
    max_context,
    moe_touched_fraction,
    plan_fit,
    recommend,
    runtime_overhead_bytes,
    working_memory_bytes,
)
from qwen35.plan.sharding import LayoutError, rank_weights, valid_tp_sizes, validate_layout

# The article's table, as printed: parameters, BF16 "GB" and FP8 "GB" (GiB = 2^30 bytes).
ARTICLE = {
    "0.8B": ("873M", "1.63", None),
    "2B": ("2.27B", "4.24", None),
    "4B": ("4.66B", "8.68", None),
    "9B": ("9.65B", "17.98", None),
    "27B": ("27.78B", "51.75", "28.75"),
    "35B-A3B": ("35.95B", "66.97", "34.88"),
    "122B-A10B": ("125.09B", "232.99", "118.42"),
    "397B-A17B": ("403.40B", "751.39", "378.23"),
}
# Architecture doc section 4: exact totals and the text / vision / MTP split as printed there.
EXACT = {
    "0.8B": (873_438_784, "752.4M", "100.6M", "20.5M"),
    "2B": (2_274_069_824, "1.882B", "331.4M", "60.8M"),
    "4B": (4_659_865_088, "4.206B", "333.5M", "120.6M"),
    "9B": (9_653_104_368, "8.954B", "456.0M", "243.3M"),
    "27B": (27_781_427_952, "26.896B", "460.7M", "424.7M"),
    "35B-A3B": (35_951_822_704, "34.661B", "446.6M", "844.6M"),
    "122B-A10B": (125_086_497_008, "122.112B", "451.3M", "2.524B"),
    "397B-A17B": (403_397_928_944, "396.346B", "456.0M", "6.596B"),
}


def cfg_of(tag: str) -> ModelConfig:
    return catalog.load_model_config(f"Qwen3.5-{tag}")


def as_printed(n: int, like: str) -> str:
    """Format n the way `like` is printed (same unit, same number of decimals)."""
    unit = like[-1]
    decimals = len(like[:-1].split(".")[1]) if "." in like else 0
    return f"{n / (1e6 if unit == 'M' else 1e9):.{decimals}f}{unit}"


@pytest.mark.parametrize("tag", list(ARTICLE))
def test_article_params_and_sizes(tag):
    params, bf16, fp8 = ARTICLE[tag]
    cfg = cfg_of(tag)
    assert as_printed(param_counts(cfg).total, params) == params
    assert f"{weight_bytes(cfg, 'bf16') / GIB:.2f}" == bf16
    if fp8 is not None:
        assert f"{weight_bytes(cfg, 'fp8') / GIB:.2f}" == fp8


@pytest.mark.parametrize("tag", list(EXACT))
def test_exact_params_and_split(tag):
    total, text, vision, mtp = EXACT[tag]
    p = param_counts(cfg_of(tag))
    assert p.total == total == p.text + p.vision + p.mtp
    assert as_printed(p.text, text) == text
    assert as_printed(p.vision, vision) == vision
    assert as_printed(p.mtp, mtp) == mtp


def test_active_params_match_the_names():
    # A3B / A10B / A17B: about 3, 10 and 17 billion parameters run per token
    for tag, approx in (("35B-A3B", 3.5e9), ("122B-A10B", 9.8e9), ("397B-A17B", 17.3e9)):
        assert param_counts(cfg_of(tag)).active == pytest.approx(approx, rel=0.02)
    dense = cfg_of("9B")
    assert param_counts(dense).active == param_counts(dense).text


def test_fp8_bytes_by_hand():
    # one expert gate_proj of 35B-A3B: [512, 2048] -> 4 x 16 blocks of BF16 scales
    assert fp8_block_scales((512, 2048)) == 64
    assert fp8_block_scales((48, 5120)) == 1 * 40  # partial blocks count whole
    t = next(t for t in text_tensors(cfg_of("35B-A3B")) if t.expert and "gate_proj" in t.name)
    assert t.count == 40 * 256
    assert tensor_bytes(t, "fp8") == 40 * 256 * (512 * 2048 + 64 * 2)
    assert tensor_bytes(t, "bf16") == 40 * 256 * 512 * 2048 * 2
    # BF16-kept tensors cost 2 bytes either way
    embed = next(t for t in text_tensors(cfg_of("27B")) if "embed_tokens" in t.name)
    assert tensor_bytes(embed, "fp8") == tensor_bytes(embed, "bf16") == 248320 * 5120 * 2


def test_text_only_drops_vision_and_mtp():
    cfg = cfg_of("27B")
    p = param_counts(cfg)
    assert weight_bytes(cfg, "bf16", text_only=True) == 2 * p.text
    assert {t.part for t in weight_tensors(cfg, text_only=True)} == {"text"}


# ---- cross-check with transformers (the oracle) -------------------------------------------


def _hf_counts(raw: dict) -> tuple[int, int]:
    """(text, vision) parameters of transformers' model built on the meta device."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    moe = "moe" in raw.get("model_type", "")
    if "text_config" in raw:
        ccls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        mcls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
    else:
        ccls = tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig
        mcls = tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM
    with torch.device("meta"):
        model = mcls(ccls(**raw))
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
    return sum(p.numel() for p in model.parameters()) - vision, vision


@pytest.mark.parametrize("name", ["Qwen3.5-0.8B", "Qwen3.5-27B", "Qwen3.5-35B-A3B"])
def test_counts_match_transformers_official(name):
    raw = catalog.load_raw(name)
    p = param_counts(ModelConfig.from_hf(raw, name=name))
    assert _hf_counts(raw) == (p.text, p.vision)  # HF drops the MTP head


@pytest.mark.parametrize(
    "raw",
    [
        dict(model_type="qwen3_5_text", vocab_size=300, hidden_size=64, num_hidden_layers=5,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
             linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=24,
             intermediate_size=80, tie_word_embeddings=True),
        dict(model_type="qwen3_5_moe_text", vocab_size=256, hidden_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
             shared_expert_intermediate_size=40, tie_word_embeddings=False),
    ],
    ids=["tiny-dense-tied", "tiny-moe"],
)  # fmt: skip
def test_counts_match_transformers_any_config(raw):
    p = param_counts(ModelConfig.from_hf(raw))
    assert p.vision == 0 and p.mtp == 0
    assert _hf_counts(raw) == (p.text, 0)


# ---- caches: KV per token, DeltaNet state per sequence ------------------------------------


def test_cache_bytes_27b():
    cfg = cfg_of("27B")
    spec = cache_spec(cfg)
    # 16 full-attention layers x (K and V) x 4 KV heads x head_dim 256 x 2 bytes (bf16)
    assert spec.kv_bytes_per_token == 16 * 2 * 4 * 256 * 2 == 65_536
    # 48 DeltaNet layers x (recurrent 48 v-heads x 128 x 128 x 4 B fp32
    #                       + conv (2*16*128 + 48*128 channels) x 3 x 2 B bf16)
    recurrent = 48 * 128 * 128 * 4
    conv = (2 * 16 * 128 + 48 * 128) * 3 * 2
    assert spec.state_bytes_per_sequence == 48 * (recurrent + conv) == 153_944_064
    assert cache_spec(cfg, kv_dtype="fp8").kv_bytes_per_token == 32_768
    half = 48 * (recurrent // 2 + conv)
    assert cache_spec(cfg, state_dtype="bf16").state_bytes_per_sequence == half
    # tp=8 > 4 KV heads: one replicated head per rank; DeltaNet heads split 8 ways
    tp8 = cache_spec(cfg, tp=8)
    assert tp8.kv_bytes_per_token == 16 * 2 * 1 * 256 * 2
    assert tp8.state_bytes_per_sequence == 48 * (recurrent + conv) // 8


def test_speculative_caches_and_fit():
    """--num-speculative-tokens 1: the MTP head's attention layer adds K+V per token and every
    running sequence holds a spare DeltaNet state (not a checkpoint: one state each)."""
    cfg = cfg_of("27B")
    base, spec = cache_spec(cfg), cache_spec(cfg, speculative_tokens=1)
    assert spec.kv_bytes_per_token == (16 + 1) * 2 * 4 * 256 * 2
    assert spec.state_bytes_per_sequence == base.state_bytes_per_sequence == 153_944_064
    assert spec.running_state_bytes == 2 * 153_944_064 and base.running_state_bytes == 153_944_064
    three = cache_spec(cfg, speculative_tokens=3)  # a spare per draft; one MTP layer still
    assert three.running_state_bytes == 4 * 153_944_064
    assert three.kv_bytes_per_token == spec.kv_bytes_per_token
    gpu = load_gpu("H100")
    plain = plan_fit(cfg, gpu, num_gpus=2, context=32768)
    drafts = plan_fit(cfg, gpu, num_gpus=2, context=32768, speculative_tokens=1)
    assert (drafts.deployment.tp, drafts.deployment.dp) == (1, 2)  # fits one: replicas
    assert drafts.kv_bytes_per_token == spec.kv_bytes_per_token
    assert drafts.state_bytes_per_sequence == spec.running_state_bytes
    assert drafts.max_concurrency < plain.max_concurrency
    small = custom_gpu(60, 3000)  # room for less than the model's longest context
    assert (plan_fit(cfg, small, speculative_tokens=1).max_context
            < plan_fit(cfg, small).max_context)  # fmt: skip
    one = Deployment(cfg, speculative_tokens=1)
    assert one.bytes_per_gpu(3, 1000) - Deployment(cfg).bytes_per_gpu(3, 1000) == 3 * (
        base.state_bytes_per_sequence + 1000 * 2 * 4 * 256 * 2
    )
    # tensor parallelism: each GPU holds its share of the MTP layer's KV (split like the others')
    tp2 = plan_fit(cfg, gpu, num_gpus=2, tp=2, context=32768, speculative_tokens=1)
    assert tp2.deployment.tp == 2
    assert tp2.kv_bytes_per_token == cache_spec(cfg, tp=2, speculative_tokens=1).kv_bytes_per_token
    assert tp2.kv_bytes_per_token == (16 + 1) * 2 * 2 * 256 * 2  # 2 of the 4 KV heads a GPU
    assert tp2.state_bytes_per_sequence == 2 * base.state_bytes_per_sequence // 2
    ep = plan_fit(cfg_of("35B-A3B"), gpu, num_gpus=2, ep=True, speculative_tokens=1)
    assert ep.deployment.ep and ep.fits
    for kwargs, msg in (
        (dict(text_only=True), "--text-only leaves out"),
        (dict(speculative_tokens=6), "0 .. 5"),
    ):
        with pytest.raises(PlanError, match=msg):
            plan_fit(cfg, gpu, **{"speculative_tokens": 1, **kwargs})
    bare = ModelConfig.from_hf(dict(model_type="qwen3_5_text", vocab_size=300, hidden_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, intermediate_size=80))  # no mtp_num_hidden_layers; fmt: skip
    with pytest.raises(PlanError, match="no MTP head"):
        plan_fit(bare, gpu, context=1024, speculative_tokens=1)
    with pytest.raises(ValueError, match="no MTP head"):
        cache_spec(bare, speculative_tokens=1)


def test_ngram_drafts_plan_no_mtp_kv():
    """--speculative-method ngram: the spare states of the drafts, no MTP KV layer, no MTP head
    needed (text-only and checkpoints without one plan fine), with tensor parallelism too."""
    cfg = cfg_of("27B")
    mtp, ngram = cache_spec(cfg, speculative_tokens=3), cache_spec(cfg, speculative_tokens=3, mtp=False)
    assert ngram.kv_bytes_per_token == cache_spec(cfg).kv_bytes_per_token < mtp.kv_bytes_per_token
    assert ngram.running_state_bytes == mtp.running_state_bytes == 4 * 153_944_064
    gpu = load_gpu("H100")
    fit_mtp = plan_fit(cfg, gpu, context=32768, speculative_tokens=3)
    fit_ngram = plan_fit(cfg, gpu, context=32768, speculative_tokens=3, speculative_method="ngram")
    assert fit_ngram.kv_bytes_per_token == ngram.kv_bytes_per_token
    assert fit_ngram.max_concurrency >= fit_mtp.max_concurrency
    text = plan_fit(cfg, gpu, text_only=True, speculative_tokens=3, speculative_method="ngram")
    assert text.deployment.text_only
    tp2 = plan_fit(cfg, gpu, num_gpus=2, tp=2, speculative_tokens=1, speculative_method="ngram")
    assert tp2.kv_bytes_per_token == cache_spec(cfg, tp=2).kv_bytes_per_token
    with pytest.raises(PlanError, match="mtp or ngram"):
        plan_fit(cfg, gpu, speculative_tokens=1, speculative_method="eagle")
    bare = dataclasses.replace(cfg, mtp_num_hidden_layers=0)
    assert plan_fit(bare, gpu, speculative_tokens=1, speculative_method="ngram").fits
    with pytest.raises(PlanError, match="--speculative-method ngram"):
        plan_fit(bare, gpu, speculative_tokens=1)


def test_cache_bytes_35b_a3b():
    spec = cache_spec(cfg_of("35B-A3B"))
    assert spec.kv_bytes_per_token == 10 * 2 * 2 * 256 * 2 == 20_480
    recurrent = 32 * 128 * 128 * 4
    conv = (2 * 16 * 128 + 32 * 128) * 3 * 2
    assert spec.state_bytes_per_sequence == 30 * (recurrent + conv) == 64_389_120


# ---- tensor / expert parallel layouts ------------------------------------------------------


def test_fp8_block_divisibility_refuses_35b_tp8():
    cfg = cfg_of("35B-A3B")
    validate_layout(cfg, 8, dtype="bf16")  # BF16 has no block constraint
    validate_layout(cfg, 4, dtype="fp8")  # 512 / 4 = 128: whole blocks
    with pytest.raises(LayoutError, match=r"512 rows split 8 ways give 64 per rank.*128"):
        validate_layout(cfg, 8, dtype="fp8")
    # expert parallelism keeps experts whole, but the shared expert (512) is still split
    with pytest.raises(LayoutError, match="shared_expert"):
        validate_layout(cfg, 8, ep=8, dtype="fp8")
    assert valid_tp_sizes(cfg, dtype="fp8") == [1, 2, 4]


def test_head_rules():
    cfg = cfg_of("27B")  # 24 attention heads, 4 KV heads, 16 DeltaNet key heads
    with pytest.raises(LayoutError, match="24 attention heads"):
        validate_layout(cfg, 16)
    with pytest.raises(LayoutError, match="DeltaNet key heads"):
        validate_layout(cfg_of("9B"), 32)
    assert valid_tp_sizes(cfg) == [1, 2, 4, 8]
    with pytest.raises(LayoutError, match="divide the 256 experts"):
        validate_layout(cfg_of("35B-A3B"), 1, ep=3)


def test_rank_weights_split():
    cfg = cfg_of("9B")  # 4 KV heads: tp=2 splits everything that is not replicated
    full = rank_weights(cfg, "bf16")
    assert full.total == weight_bytes(cfg, "bf16")
    half = rank_weights(cfg, "bf16", tp=2)
    replicated = sum(
        tensor_bytes(t, "bf16") for t in weight_tensors(cfg) if t.split == "replicated"
    )
    assert 2 * half.total - replicated == full.total
    # expert parallelism divides the routed experts whole
    moe = cfg_of("35B-A3B")
    assert rank_weights(moe, "bf16", tp=1, ep=4).experts * 4 == rank_weights(moe, "bf16").experts


# ---- runtime memory --------------------------------------------------------------------------


def test_working_memory_terms():
    cfg = cfg_of("27B")
    base = working_memory_bytes(cfg, 2048, 0)
    # logits: fp32 logits and probabilities of each sampled row over the 248,320-entry vocab
    assert working_memory_bytes(cfg, 2048, 10) - base == 10 * 248_320 * 4 * 2
    assert working_memory_bytes(cfg, 4096, 0) > base > working_memory_bytes(cfg, 1024, 0)
    assert working_memory_bytes(cfg, 2048, 0, tp=4) < base
    assert runtime_overhead_bytes(1) == GIB and runtime_overhead_bytes(2) > GIB
    with pytest.raises(PlanError):
        working_memory_bytes(cfg, 0, 1)


def test_fit_arithmetic_on_a_custom_gpu():
    cfg = cfg_of("9B")
    gpu = custom_gpu(24, 1000)
    dep = Deployment(cfg)
    spec = cache_spec(cfg)
    fixed = (
        weight_bytes(cfg, "bf16")
        + runtime_overhead_bytes(1)
        + working_memory_bytes(cfg, 2048, 1)
        + spec.state_bytes_per_sequence
    )
    assert max_context(dep, gpu.memory_bytes) == (24 * GIB - fixed) // spec.kv_bytes_per_token
    n = max_concurrency(dep, gpu.memory_bytes, 32768)
    assert dep.bytes_per_gpu(n, 32768) <= gpu.memory_bytes < dep.bytes_per_gpu(n + 1, 32768)
    f = plan_fit(cfg, gpu, context=32768, batch=n)
    assert f.fits and f.max_concurrency == n
    assert not plan_fit(cfg, gpu, context=32768, batch=n + 1).fits
    tiny = plan_fit(cfg, custom_gpu(8), context=1024)
    assert not tiny.loads and "needs" in tiny.reason


def test_auto_tp_uses_the_fewest_ranks_that_fit():
    h100 = load_gpu("H100")
    f = plan_fit(cfg_of("122B-A10B"), h100, dtype="fp8", num_gpus=4)
    assert f.fits and f.deployment.tp == 2 and f.deployment.dp == 2
    f = plan_fit(cfg_of("397B-A17B"), load_gpu("H200"), dtype="fp8", num_gpus=8)
    assert f.fits and f.deployment.tp == 4
    with pytest.raises(LayoutError):
        plan_fit(cfg_of("35B-A3B"), h100, dtype="fp8", num_gpus=8, tp=8)


def test_plan_errors():
    cfg, gpu = cfg_of("9B"), load_gpu("RTX 4090")
    for kwargs, msg in (
        (dict(num_gpus=0), "num-gpus"),
        (dict(num_gpus=8, tp=3), "divide"),
        (dict(context=300_000), "native 262,144 tokens.*--yarn 4"),
        (dict(batch=0), "batch"),
    ):
        with pytest.raises(PlanError, match=msg):
            plan_fit(cfg, gpu, **kwargs)


# ---- decode roofline -----------------------------------------------------------------------


def test_decode_roofline_dense_by_hand():
    cfg, ctx = cfg_of("9B"), 32768
    gpu = GpuSpec("bw only", 80, bandwidth_gb_s=1000)  # no FLOP peak: purely bandwidth-bound
    dep = Deployment(cfg)
    w = rank_weights(cfg, "bf16")
    spec = cache_spec(cfg)
    # untied: the input embedding is read one row per token; vision and MTP are not read
    expect = w.dense + 4096 * 2 + ctx * spec.kv_bytes_per_token + 2 * spec.state_bytes_per_sequence
    assert decode_step_bytes(dep, 1, ctx) == pytest.approx(expect)
    assert decode_tokens_per_s(dep, gpu, 1, ctx) == pytest.approx(1e12 / expect)
    assert decode_tokens_per_s(dep, gpu, 8, ctx) > 4 * decode_tokens_per_s(dep, gpu, 1, ctx)


def test_moe_reads_few_experts_the_article_tradeoff():
    moe = cfg_of("35B-A3B")
    assert moe_touched_fraction(moe, 1) == pytest.approx(8 / 256)
    assert moe_touched_fraction(moe, 64) == pytest.approx(1 - (1 - 8 / 256) ** 64)
    gpu = load_gpu("H100")
    rate = {
        t: decode_tokens_per_s(Deployment(cfg_of(t)), gpu, 1, 32768)
        for t in ("35B-A3B", "4B", "9B")
    }
    # ~36B parameters of knowledge decode faster than the 4B and 9B dense models ...
    assert rate["35B-A3B"] > rate["4B"] > rate["9B"]
    # ... while every expert stays resident
    assert weight_bytes(moe, "bf16") > 7 * weight_bytes(cfg_of("4B"), "bf16")


# ---- GPU catalog and recommendations -------------------------------------------------------


def test_gpu_catalog():
    need = ["RTX 3090", "RTX 4090", "RTX 5090", "RTX A6000", "RTX 6000 Ada", "L40S", "A100 40GB",
            "A100 80GB", "H100 SXM", "H200", "B200", "MI300X"]  # fmt: skip
    assert set(need) <= set(gpu_names())
    for name in gpu_names():
        g = load_gpu(name)
        assert g.memory_gib > 0 and g.bandwidth_gb_s > 0 and g.bf16_tflops > 0 and g.source
    assert load_gpu("rtx4090").name == load_gpu("GeForce RTX 4090").name == "RTX 4090"
    assert load_gpu("h100").name == "H100 SXM"
    with pytest.raises(catalog.UnknownNameError, match="did you mean 'RTX 4090'"):
        load_gpu("RTX 4080")
    with pytest.raises(ValueError):
        custom_gpu(-1)


@pytest.mark.parametrize(
    "gpu,model,dtype",
    # the article's practical takeaway, at a 32K context
    [("RTX 4090", "Qwen3.5-9B", "bf16"), ("RTX A6000", "Qwen3.5-35B-A3B", "fp8"),
     ("H200", "Qwen3.5-122B-A10B", "fp8")],
)  # fmt: skip
def test_recommendations(gpu, model, dtype):
    g = load_gpu(gpu)
    fits = []
    for name in catalog.base_model_names():
        cfg = catalog.load_model_config(name)
        for d in ("bf16", "fp8") if catalog.has_fp8_release(name) else ("bf16",):
            fits.append(plan_fit(cfg, g, dtype=d, context=32768))
    rec = recommend(fits)
    assert (rec.fit.deployment.cfg.name, rec.fit.deployment.dtype) == (model, dtype)
    assert "largest" in rec.why
    assert recommend([f for f in fits if not f.fits]) is None
    assert math.isfinite(rec.fit.decode_tokens_per_s_batch1)
