"""YaRN RoPE scaling past the native context: config.json's `rope_type: "yarn"` (Qwen's
long-context recipe) and `--yarn FACTOR` (engine, planner), against transformers' YaRN."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from qwen35.catalog import load_model_config, load_raw
from qwen35.cli import main
from qwen35.config import ConfigError, ModelConfig
from qwen35.errors import Qwen35Error
from qwen35.layers.rotary import RotaryEmbedding
from qwen35.models.qwen3_5 import Qwen35ForCausalLM
from qwen35.plan.launch import launch_commands
from qwen35.plan.planner import Deployment

pytestmark = pytest.mark.filterwarnings("ignore")

QWEN_RECIPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}


def _official(**rope) -> dict:
    """The 0.8B's official config.json with its text rope_parameters updated."""
    raw = json.loads(json.dumps(load_raw("Qwen3.5-0.8B")))
    raw["text_config"]["rope_parameters"].update(rope)
    return raw


def test_the_model_cards_edit_extends_the_context():
    cfg = ModelConfig.from_hf(_official(**QWEN_RECIPE), name="Qwen3.5-0.8B")
    assert cfg.yarn is not None and cfg.yarn.factor == 4.0
    assert cfg.native_context == 262144 and cfg.max_position_embeddings == 4 * 262144
    plain = load_model_config("0.8B")
    assert plain.yarn is None and plain.max_position_embeddings == plain.native_context == 262144
    assert plain.with_yarn(4) == cfg  # --yarn 4 is the same model as the edited config
    assert cfg.with_yarn(2).max_position_embeddings == 2 * 262144  # over the native length
    # older configs: rope_scaling with "type", and "mrope" for the plain multimodal RoPE
    old = json.loads(json.dumps(load_raw("Qwen3.5-0.8B")))
    t = old["text_config"]
    t["rope_scaling"] = {"type": "yarn", "factor": 2.0, **t.pop("rope_parameters")}
    t["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf(old).yarn.factor == 2.0
    assert ModelConfig.from_hf(_official(rope_type="mrope")).yarn is None


@pytest.mark.parametrize(
    "rope,msg",
    [
        ({"rope_type": "linear", "factor": 2.0}, "rope_type' 'linear' is not supported"),
        ({"rope_type": "yarn"}, "rope_parameters.factor' is required"),
        ({"rope_type": "yarn", "factor": 0.5}, "factor' must be a number >= 1"),
        ({"rope_type": "yarn", "factor": "4"}, "factor' must be a number"),
        ({**QWEN_RECIPE, "original_max_position_embeddings": -3}, "original_max_position"),
    ],
)
def test_bad_rope_parameters_are_refused_by_name(rope, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf(_official(**rope))


@pytest.mark.parametrize("factor", [1, 0.5, float("nan"), float("inf"), True, "4"])
def test_with_yarn_needs_a_factor_above_one(factor):
    with pytest.raises(ConfigError, match="factor > 1"):
        load_model_config("0.8B").with_yarn(factor)


@pytest.mark.parametrize(
    "extra",
    [
        {"factor": 4.0, "original_max_position_embeddings": 64},
        {"factor": 2.5, "original_max_position_embeddings": 1000, "beta_fast": 16,
         "mscale": 1.0, "mscale_all_dim": 0.5},  # fmt: skip
        {"factor": 8.0, "original_max_position_embeddings": 100, "attention_factor": 0.9,
         "truncate": False},  # fmt: skip
        QWEN_RECIPE,
    ],
)
def test_frequencies_and_scale_equal_transformers(extra):
    """inv_freq bit for bit and the cos / sin factor of transformers' YaRN."""
    from transformers import Qwen3_5TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_theta": 1e7, "partial_rotary_factor": 0.25, **extra, "rope_type": "yarn"}
    d = tiny.tiny_config_dict(rope_parameters=rope)
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](Qwen3_5TextConfig(**d))
    cfg = ModelConfig.from_hf({**d, "model_type": "qwen3_5_text"})
    rot = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section, cfg.yarn)
    assert torch.equal(rot.inv_freq(torch.device("cpu")), inv)
    assert rot.scale == scale and scale != 1.0
    plain = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section)
    assert not torch.equal(plain.inv_freq(torch.device("cpu")), inv)


@pytest.mark.parametrize("moe", [False, True])
def test_logits_equal_transformers_past_the_original_context(moe):
    """A tiny model with YaRN over an original context of 64 tokens, run on 150: logits within
    1e-4 of transformers' (and not those of the unscaled RoPE), also through the paged path."""
    from test_model import Pager, _rel

    rope = {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
            "factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    hf = tiny.hf_model(moe=moe, rope_parameters=rope)
    cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    assert cfg.yarn is not None and cfg.yarn.original_max_position_embeddings == 64
    ours = Qwen35ForCausalLM(cfg, dtype=torch.float32)
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    out = ours(ids)
    assert _rel(out, ref) < 1e-4
    plain = Qwen35ForCausalLM(ModelConfig.from_hf({**json.loads(hf.config.to_json_string()),
                                                   "rope_parameters": {**rope, "rope_type": "default"}}),
                              dtype=torch.float32)  # fmt: skip
    plain.load_state_dict(hf.state_dict())
    assert _rel(plain(ids), ref) > 1e-3  # the scaling matters at these positions
    pager = Pager(ours)  # chunked prefill + decode over the paged caches: the same logits
    got = pager.step([(0, ids[0, :140])]) + [pager.step([(0, ids[0, t : t + 1])])[0]
                                             for t in range(140, 150)]  # fmt: skip
    assert _rel(torch.cat(got), out[0]) < 1e-4


def test_engine_flag_loads_the_scaled_model(tmp_path):
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.loader import load_model

    cfg = tiny.tiny_config_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, "model_type": "qwen3_5_text"}))
    eng = LLMEngine(str(path), load_format="random", yarn=4, verbose=False, max_memory="1GiB")
    assert eng.model.config.yarn.factor == 4.0
    assert eng.model.config.max_position_embeddings == 4 * cfg["max_position_embeddings"]
    assert eng.model.rotary.yarn == eng.model.config.yarn
    with pytest.raises(Qwen35Error, match="exceeds the model's 4,096 positions: YaRN extends"):
        LLMEngine(str(path), load_format="random", max_model_len=5000, verbose=False)
    eng = LLMEngine(str(path), load_format="random", yarn=2, max_model_len=5000, verbose=False,
                    max_memory="1GiB")  # fmt: skip
    assert eng.max_model_len == 5000
    loaded = load_model(str(path), dtype="fp32", load_format="random")
    with pytest.raises(Qwen35Error, match="yarn applies when the engine loads the model"):
        LLMEngine(loaded, yarn=4, verbose=False)
    with pytest.raises(Qwen35Error, match="factor > 1"):
        LLMEngine(str(path), load_format="random", yarn=0.5, verbose=False)


def test_plan_extends_the_context_with_yarn(capsys):
    assert main(["plan", "-m", "9B", "--context", "1M"]) == 2
    err = capsys.readouterr().err
    assert "native 262,144 tokens" in err and "--yarn 4" in err
    assert main(["plan", "-m", "9B", "--gpu", "H200", "--context", "1M", "--yarn", "4",
                 "--json"]) == 0  # fmt: skip
    d = json.loads(capsys.readouterr().out)
    assert d["models"][0]["yarn_factor"] == 4.0
    fit = d["models"][0]["fits"]["bf16"]
    assert fit["fits"] and fit["max_context"] == 4 * 262144
    assert "--yarn 4" in d["recommendation"]["launch"]["qwen35"]
    assert main(["plan", "-m", "9B", "--context", "2M", "--yarn", "4"]) == 2
    assert "with YaRN factor 4" in capsys.readouterr().err
    assert main(["plan", "--yarn", "1"]) == 2
    assert "factor > 1" in capsys.readouterr().err


def test_launch_commands_carry_the_scaling():
    dep = Deployment(load_model_config("9B").with_yarn(4), "bf16", tp=1)
    cmds = launch_commands(dep, 1_000_000)
    assert "--yarn 4" in cmds["qwen35"] and "--max-model-len 1000000" in cmds["qwen35"]
    for engine, flag in (("vllm", "--hf-overrides '"), ("sglang", "--json-model-override-args '")):
        override = json.loads(cmds[engine].split(flag)[1].split("'")[0])
        rope = override["text_config"]["rope_parameters"]
        assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
        assert rope["original_max_position_embeddings"] == 262144
    plain = launch_commands(Deployment(load_model_config("9B"), "bf16", tp=1), 32768)
    assert "yarn" not in json.dumps(plain)


def test_rope_parameters_round_trip():
    """ModelConfig.rope_parameters() (what transformers baselines and vLLM / SGLang overrides
    get) parses back to the same scaling."""
    for cfg in (load_model_config("9B"), load_model_config("9B").with_yarn(4),
                ModelConfig.from_hf(_official(**QWEN_RECIPE, beta_fast=16, mscale=1.0))):  # fmt: skip
        back = ModelConfig.from_hf(_official(**cfg.rope_parameters()))
        assert back.yarn == cfg.yarn
