"""`qwen35 quantize --lora ADAPTER`: a PEFT LoRA adapter merged into a checkpoint's weights (qwen35/
lora.py). The oracle is peft itself: the adapter is made and applied by peft on transformers'
model, whose logits the merged checkpoint must give in our model; FP8 bases are dequantised,
merged and quantised again; adapters that cannot be merged are refused before anything is
written."""

from __future__ import annotations

import json

import pytest
import torch

from qwen35.lora import LoraError
from qwen35.quant import formats
from qwen35.quant.checkpoint import convert_checkpoint
from tiny import hf_torch_path, save_checkpoint, save_fp8_checkpoint, save_lora_adapter

peft = pytest.importorskip("peft", reason="peft (the [test] extra) is the oracle of LoRA merging")

IDS = [[5, 17, 99, 3, 42, 7, 200, 11, 64, 128, 9, 33]]


def our_logits(d) -> torch.Tensor:
    from qwen35.loader import load_model

    model = load_model(str(d), dtype="fp32")
    return model(torch.tensor(IDS))[0]


def peft_logits(pm) -> torch.Tensor:
    with hf_torch_path(), torch.no_grad():
        return pm(torch.tensor(IDS)).logits[0].float()


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_checkpoint_equals_peft(tmp_path, moe, rslora):
    src = tmp_path / "base"
    hf = save_checkpoint(src, moe=moe, layout="vlm", experts="per_expert")
    base = peft_logits(hf)
    pm = save_lora_adapter(hf, tmp_path / "adapter", use_rslora=rslora,
                      alpha_pattern={"down_proj": 3.0})  # fmt: skip
    want = peft_logits(pm)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the model
    out = convert_checkpoint(src, tmp_path / "merged", to="bf16", lora=tmp_path / "adapter")
    torch.testing.assert_close(our_logits(out), want, rtol=0, atol=1e-4)
    # the tokenizer / config files came along; no adapter tensor names leaked in
    assert json.loads((out / "config.json").read_text())["model_type"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [k for k in index if "lora" in k]


def test_fp8_base_is_merged_and_quantised_again(tmp_path):
    fp8, ref = tmp_path / "fp8", tmp_path / "ref"
    save_fp8_checkpoint(fp8, ref, moe=False, experts="per_expert")
    with hf_torch_path():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32)
    save_lora_adapter(hf, tmp_path / "adapter")
    merged = convert_checkpoint(fp8, tmp_path / "m-bf16", to="bf16", lora=tmp_path / "adapter")
    requant = convert_checkpoint(fp8, tmp_path / "m-fp8", to="fp8", lora=tmp_path / "adapter")
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as g:
                out.update({k: g.get_tensor(k) for k in g.keys()})
        return out

    a, q, src = tensors(merged), tensors(requant), tensors(fp8)
    k = "model.language_model.layers.3.self_attn.q_proj.weight"
    assert src[k].dtype == formats.FP8_DTYPE and q[k].dtype == formats.FP8_DTYPE
    qq, ss = formats.quantize_fp8_blocks(a[k])  # the merged BF16 weight, quantised
    assert torch.equal(q[k].view(torch.uint8), qq.view(torch.uint8))
    assert torch.equal(q[k.removesuffix(".weight") + ".weight_scale_inv"], ss)
    assert not torch.equal(q[k].view(torch.uint8), src[k].view(torch.uint8))  # merged
    untouched = "model.language_model.layers.0.linear_attn.in_proj_b.weight"
    assert torch.equal(q[untouched], src[untouched])


def _adapter_dir(tmp_path, cfg: dict, tensors: dict):
    from safetensors.torch import save_file

    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                       "lora_alpha": 4, **cfg}))  # fmt: skip
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize(
    "cfg,tensors,match",
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "all"}, None, "biases"),
        ({"peft_type": "IA3"}, None, "not a LoRA adapter"),
        # each an AttributeError / re.error traceback, or NaN weights, before
        ({"alpha_pattern": 10**12}, None, "alpha_pattern must map module patterns to numbers"),
        ({"alpha_pattern": {"out_proj": "x"}}, None, "alpha_pattern must map"),
        ({"alpha_pattern": {"(": 4}}, None, "not a regular expression"),
        ({"lora_alpha": float("nan")}, None, "lora_alpha must be a number"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 256)},
         "not a LoRA A / B weight"),
        ({}, {"base_model.model.model.layers.0.linear_attn.out_proj.lora_A.weight":
              torch.zeros(2, 64)}, "no lora_B"),
        ({}, {"base_model.model.model.layers.0.nothing_here.lora_A.weight": torch.zeros(2, 64),
              "base_model.model.model.layers.0.nothing_here.lora_B.weight": torch.zeros(64, 2)},
         "no weight in the base checkpoint"),
        ({}, {"base_model.model.model.layers.0.linear_attn.out_proj.lora_A.weight":
              torch.zeros(2, 65),
              "base_model.model.model.layers.0.linear_attn.out_proj.lora_B.weight":
              torch.zeros(64, 2)}, "base's"),
    ],
)  # fmt: skip
def test_unmergeable_adapters_are_refused_before_writing(tmp_path, cfg, tensors, match):
    src = tmp_path / "base"
    save_checkpoint(src)
    ok = {"base_model.model.model.layers.0.linear_attn.out_proj.lora_A.weight": torch.zeros(2, 64),
          "base_model.model.model.layers.0.linear_attn.out_proj.lora_B.weight": torch.zeros(64, 2)}
    d = _adapter_dir(tmp_path, cfg, tensors if tensors is not None else ok)
    with pytest.raises(LoraError, match=match):
        convert_checkpoint(src, tmp_path / "out", to="bf16", lora=d)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli(tmp_path, capsys):
    from qwen35.cli import main

    src = tmp_path / "base"
    hf = save_checkpoint(src)
    save_lora_adapter(hf, tmp_path / "adapter")
    assert main(["quantize", str(src), str(tmp_path / "out"), "--to", "bf16", "--lora",
                 str(tmp_path / "adapter")]) == 0  # fmt: skip
    assert "LoRA" in capsys.readouterr().out
    assert main(["quantize", str(src), str(tmp_path / "out2"), "--lora", str(tmp_path)]) != 0
    assert "adapter_config.json" in capsys.readouterr().err
