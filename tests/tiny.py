"""Tiny random Qwen 3.5 checkpoints built with transformers (the reference), for tests.

`hf_model(...)` returns a transformers `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` in fp32 with
random weights, norm weights randomised so the zero-centred `1 + w` convention is exercised.
`save_checkpoint(dir, ...)` writes it as a model directory in one of the on-disk layouts:
- layout="text": transformers' own `save_pretrained` (flat config, `model.*` names);
- layout="vlm": the official layout (nested config, `model.language_model.*`, plus a complete random
  `model.visual.*` tower and `mtp.*` tensors that a text-only loader must skip);
- experts="fused" (`experts.gate_up_proj` [E, 2I, H]) or "per_expert" (`experts.{e}.*_proj.weight`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from pathlib import Path

import torch

VOCAB_REAL = 248320  # the real Qwen 3.5 vocabulary size (needed with the real tokenizer)


# transformers' Qwen 3.5 modules call these module-level functions; each is wrapped to take an
# installed kernel package's version instead (fla-core for the gated delta rule, causal-conv1d).
_HF_KERNEL_FUNCS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


@contextlib.contextmanager
def hf_torch_path():
    """Run transformers' Qwen 3.5 reference on its plain PyTorch functions. With fla-core
    importable (the GPU machine), transformers 5.x routes its gated delta rule to fla's Triton
    kernels whatever the tensors' device, and a CPU reference then fails there: compiled Triton
    refuses CPU tensors (only the interpreter takes them). The wrappers' own torch path is taken,
    with their keyword filtering."""

    def torch_only(fn):
        base = inspect.unwrap(fn)
        params = set(inspect.signature(base).parameters)
        return lambda *a, **kw: base(*a, **{k: v for k, v in kw.items() if k in params})

    saved = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("transformers.models.qwen3_5"):
            continue
        for attr in _HF_KERNEL_FUNCS:
            fn = getattr(mod, attr, None)
            if fn is not None and inspect.unwrap(fn) is not fn:
                saved.append((mod, attr, fn))
                setattr(mod, attr, torch_only(fn))
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def tiny_config_dict(moe: bool = False, **overrides) -> dict:
    cfg = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,  # 3 DeltaNet + 1 full attention
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=1,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
        },
    )
    if moe:
        cfg.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        )
    else:
        cfg.update(intermediate_size=96)
    cfg.update(overrides)
    return cfg


def hf_model(moe: bool = False, seed: int = 0, **overrides):
    from transformers import (
        Qwen3_5ForCausalLM,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeTextConfig,
        Qwen3_5TextConfig,
    )

    cfg_cls, model_cls = (
        (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM)
        if moe
        else (Qwen3_5TextConfig, Qwen3_5ForCausalLM)
    )
    config = cfg_cls(**tiny_config_dict(moe, **overrides))
    config._attn_implementation = "eager"
    if moe:
        config._experts_implementation = "eager"
    return random_model(model_cls, config, seed)


def randomise_text_param(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    """Norm weights random (around 0 for the zero-centred `1 + w` norms, around 1 for the gated
    DeltaNet norm, which multiplies by w), A_log and dt_bias too; other parameters keep theirs."""
    if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(
            torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "linear_attn.norm" in name else 0.0)
        )
    elif name.endswith(("A_log", "dt_bias")):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def random_model(model_cls, config, seed: int, randomise=randomise_text_param):
    """model_cls(config) in fp32 eval mode, seeded, then `randomise(name, p, g)` over its
    parameters in order, from a second generator."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            randomise(name, p, g)
    return model


VISION_CONFIG = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}


def _random_tower(H: int, g: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """A complete random `model.visual.*` tower of VISION_CONFIG (the loader reads it strictly)."""
    from qwen35.config import VisionConfig
    from qwen35.models.vision import VisionModel

    tower = VisionModel(VisionConfig(**VISION_CONFIG, out_hidden_size=H), device="meta")
    return {
        f"model.visual.{k}": (torch.randn(v.shape, generator=g) * 0.05).to(dtype)
        for k, v in tower.state_dict().items()
    }


def random_mtp(text_cfg: dict, g: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """A complete random `mtp.*` head for a text config (names and shapes from qwen35's
    MTPHead; fused experts, split per expert by save_checkpoint like the main layers')."""
    from qwen35.config import ModelConfig
    from qwen35.models.mtp import MTPHead

    cfg = ModelConfig.from_hf({**text_cfg, "mtp_num_hidden_layers": 1}, name="tiny")
    head = MTPHead(cfg, 0, device="meta")
    out = {}
    for k, v in head.state_dict().items():
        x = torch.randn(v.shape, generator=g)
        scale = 0.1 if "norm" in k else (0.5 if k.endswith(("A_log", "dt_bias")) else 0.08)
        out[f"mtp.{k}"] = (x * scale).to(dtype)
    return out


def _vlm_name(name: str) -> str:
    return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name


def _per_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{base}{e}.up_proj.weight"] = up[e].contiguous()
        elif k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def save_checkpoint(
    path: Path,
    moe: bool = False,
    layout: str = "vlm",
    experts: str = "fused",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    mtp: bool = False,
    **overrides,
):
    """Write a tiny random checkpoint directory; returns the transformers model it came from.
    mtp (layout "vlm"): a complete random MTP head (`mtp.*`) and mtp_num_hidden_layers 1."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = hf_model(moe, seed, **overrides)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    text_cfg = json.loads(model.config.to_json_string())
    if layout == "text":
        cfg = text_cfg
    elif layout == "vlm":
        sd = {_vlm_name(k): v for k, v in sd.items()}
        g = torch.Generator().manual_seed(seed + 2)
        H = model.config.hidden_size
        sd.update(_random_tower(H, g, dtype))
        if mtp:  # a complete head (qwen35 loads it for speculative decoding)
            text_cfg["mtp_num_hidden_layers"] = 1
            sd.update(random_mtp(text_cfg, g, dtype))
        else:  # a partial one: a text-only loader skips mtp.* whatever it holds
            sd["mtp.fc.weight"] = torch.randn(H, 2 * H, generator=g).to(dtype)
            sd["mtp.norm.weight"] = torch.randn(H, generator=g).to(dtype)
        mt = "qwen3_5_moe" if moe else "qwen3_5"
        cfg = {
            "architectures": [
                "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
            ],
            "model_type": mt,
            "tie_word_embeddings": model.config.tie_word_embeddings,
            "text_config": text_cfg,
            "vision_config": {
                **VISION_CONFIG,
                "out_hidden_size": H,
                "model_type": mt,
            },
        }
    else:
        raise ValueError(layout)
    if experts == "per_expert":
        sd = _per_expert(sd)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in names[i * per : (i + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    return model


# ---- block-FP8 checkpoints (the official layout), written independently of qwen35.quant -------
FP8_SUFFIXES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "linear_attn.in_proj_qkv.weight",
    "linear_attn.in_proj_z.weight",
    "linear_attn.out_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], BF16 scale [ceil(out/128), ceil(in/128)] = amax / 448)."""
    out, inp = w.shape
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-out // 128), -(-inp // 128), dtype=torch.bfloat16)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            s[i, j] = (blk.abs().max() / 448).clamp(min=1e-12)
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = blk / s[i, j].float()
    return q, s


def fp8_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    big = s.float().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return q.float() * big[: q.shape[0], : q.shape[1]]


def save_fp8_checkpoint(fp8_dir: Path, bf16_dir: Path, moe: bool, experts: str, **overrides):
    """The same random model twice: in the official FP8 layout (fp8_dir) and as the model of its
    dequantised weights (bf16_dir: BF16, the dequantised matrices in FP32 so they are exact). Experts are FP8 per expert or fused ([E, ...] scales)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_checkpoint(bf16_dir, moe=moe, experts=experts, dtype=torch.bfloat16, **overrides)
    with safe_open(str(bf16_dir / "model.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    fp8, deq = {}, {}
    for k, v in sd.items():
        per_expert = ".mlp.experts." in k and k.endswith("_proj.weight")
        fused = k.endswith(("experts.gate_up_proj", "experts.down_proj"))
        shared = ".shared_expert." in k and k.endswith("_proj.weight")
        if (
            k.startswith("model.language_model.")
            and (k.endswith(FP8_SUFFIXES) or per_expert or shared)
            and not fused
        ):
            q, s = fp8_blocks(v)
            fp8[k], fp8[k.removesuffix(".weight") + ".weight_scale_inv"] = q, s
            deq[k] = fp8_dequant(q, s)  # fp32: exact
        elif fused:
            qs = [fp8_blocks(v[e]) for e in range(v.shape[0])]
            fp8[k] = torch.stack([q for q, _ in qs])
            fp8[k + "_scale_inv"] = torch.stack([s for _, s in qs])
            deq[k] = torch.stack([fp8_dequant(q, s) for q, s in qs])
        else:
            fp8[k] = deq[k] = v
    save_file(deq, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    fp8_dir.mkdir(parents=True, exist_ok=True)
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (fp8_dir / "config.json").write_text(json.dumps(cfg, indent=2))


# ---- LoRA adapters (PEFT's own format, made by peft: the [test] extra) -------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj",
                "gate_proj", "up_proj", "down_proj"]  # fmt: skip


def save_lora_adapter(hf, path, seed: int = 0, targets=LORA_TARGETS, r: int = 4, **kw):
    """A random (not zero-initialised) peft adapter on the transformers model hf, saved to path;
    -> the peft model (hf is wrapped in place: pass a fresh model for each adapter)."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=kw.pop("lora_alpha", 16), target_modules=targets,
                          init_lora_weights=False, **kw)  # fmt: skip
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf, cfg)
    for n, p in pm.named_parameters():  # peft's random init keeps B small: make it count
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    pm.save_pretrained(str(path))
    return pm


def save_random_lora_adapter(hf, path, seed: int = 0, r: int = 4, targets=LORA_TARGETS):
    """A PEFT-format adapter with random A and B on the linear layers of hf whose names end in
    one of targets, written without peft (the GPU machine has none)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            key = f"base_model.model.{name}"
            tensors[key + ".lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) * 0.3
            tensors[key + ".lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.3
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets)}
    ))  # fmt: skip
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def hub_snapshot(tmp_path, monkeypatch, repo_id: str) -> Path:
    """An offline Hugging Face cache under tmp_path (HF_HOME, HF_HUB_OFFLINE) holding repo_id at
    one revision: -> the snapshot directory to fill (created by the caller, e.g. copytree)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return repo / "snapshots" / "0123abcd"
