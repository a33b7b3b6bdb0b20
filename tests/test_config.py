from __future__ import annotations

import json

import pytest

from qwen35.cache_spec import cache_spec
from qwen35.catalog import UnknownNameError, load_model_config, load_raw, model_names, resolve_name
from qwen35.config import ConfigError, ModelConfig


def test_catalog_has_eight_models_and_four_fp8():
    names = model_names()
    assert len([n for n in names if not n.endswith("-FP8")]) == 8
    assert sorted(n for n in names if n.endswith("-FP8")) == sorted(
        f"Qwen3.5-{s}-FP8" for s in ("27B", "35B-A3B", "122B-A10B", "397B-A17B")
    )


@pytest.mark.parametrize("name", ["Qwen3.5-27B", "qwen3.5-27b", "27B", "Qwen/Qwen3.5-27B"])
def test_resolve_loose_names(name):
    assert resolve_name(name) == "Qwen3.5-27B"


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean"):
        resolve_name("Qwen3.5-28B")


def test_parse_nested_and_flat_agree():
    raw = load_raw("Qwen3.5-35B-A3B")
    nested = ModelConfig.from_hf(raw, name="x")
    flat = ModelConfig.from_hf(dict(raw["text_config"]), name="x")
    assert nested.is_moe and nested.num_experts == 256 and nested.num_experts_per_tok == 8
    assert nested.vision is not None and flat.vision is None
    for f in ("hidden_size", "layer_types", "num_key_value_heads", "linear_num_value_heads"):
        assert getattr(nested, f) == getattr(flat, f)
    assert nested.num_full_attention_layers == 10 and nested.num_linear_attention_layers == 30


def test_layer_types_from_interval():
    t = dict(load_raw("Qwen3.5-0.8B")["text_config"])
    del t["layer_types"]
    cfg = ModelConfig.from_hf(t)
    assert cfg.layer_types[3] == "full_attention" and cfg.layer_types[0] == "linear_attention"
    assert cfg.num_full_attention_layers == 6


def test_dense_config_with_zero_experts_is_dense():
    """A flat dense config that says num_experts 0 (some writers add the MoE keys as zeros)."""
    t = dict(load_raw("Qwen3.5-0.8B")["text_config"])
    t.update(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
    cfg = ModelConfig.from_hf(t)
    assert not cfg.is_moe and cfg.intermediate_size == 3584


def test_missing_key_is_named(tmp_path):
    t = dict(load_raw("Qwen3.5-0.8B")["text_config"])
    del t["hidden_size"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(t))
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(p)


def test_wrong_model_type(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf({"model_type": "llama", "hidden_size": 8})


def test_fp8_quant_config():
    cfg = load_model_config("Qwen3.5-27B-FP8")
    assert cfg.quantization is not None and cfg.quantization.weight_block_size == (128, 128)


def test_cache_spec_27b_by_hand():
    spec = cache_spec(load_model_config("27B"))
    # 16 attention layers x (K+V) x 4 heads x 256 dims x 2 bytes
    assert spec.kv_bytes_per_token == 16 * 2 * 4 * 256 * 2 == 64 * 1024
    # 48 DeltaNet layers x (48 heads x 128 x 128 x 4 B  +  (2*2048 + 48*128) channels x 3 x 2 B)
    assert spec.state_bytes_per_sequence == 48 * (48 * 128 * 128 * 4 + 10240 * 3 * 2)
