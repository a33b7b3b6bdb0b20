"""transformers' `generate` on exactly our weights: the peer every speed ratio is measured against.

The transformers model is built on the meta device from a text config derived from our
`ModelConfig`, then given our parameter tensors themselves (`load_state_dict(assign=True)`:
parameter names are identical), so both hold the same random weights in one copy of memory.

Which transformers runs: Qwen 3.5's Gated DeltaNet layers take, each on its own, the gated delta
rule of flash-linear-attention (fla-core) and the causal conv of causal-conv1d where the package
is importable (Triton / CUDA, so GPU only), else a PyTorch fallback, which it warns is much slower;
we silence that warning, so `implementation()` names the path in every table and JSON document.
"""

from __future__ import annotations

import time

import torch

from qwen35.config import ModelConfig


def hf_text_config(cfg: ModelConfig):
    """A transformers Qwen3_5(Moe)TextConfig with the same shapes as `cfg` (text only)."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    kw = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        layer_types=list(cfg.layer_types),
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=cfg.rope_parameters(),
        eos_token_id=list(cfg.eos_token_ids) or None,
    )
    if cfg.is_moe:
        return Qwen3_5MoeTextConfig(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
            **kw,
        )
    return Qwen3_5TextConfig(intermediate_size=cfg.intermediate_size, **kw)


FALLBACK = "torch fallback"


def implementation(device: torch.device | str) -> str:
    """The Gated DeltaNet path transformers takes on `device` (see the module docstring)."""
    import importlib.util

    fla, conv = (importlib.util.find_spec(m) is not None for m in ("fla", "causal_conv1d"))
    if torch.device(device).type != "cuda" or not (fla or conv):
        return FALLBACK
    if fla and conv:
        return "flash-linear-attention kernels"
    # the H200 run carries fla-core but not causal-conv1d (a CUDA build)
    return "fla delta rule, torch conv" if fla else "causal-conv1d, torch delta rule"


def build_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' Qwen3_5(Moe)ForCausalLM sharing `model`'s parameter tensors."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
    from transformers.utils import logging as hf_logging

    # its per-kernel "falling back to the PyTorch implementation" notices would break up the
    # tables; `implementation()` labels the path in the tables and the JSON instead
    hf_logging.set_verbosity_error()
    cfg = model.config
    hcfg = hf_text_config(cfg)
    cls = Qwen3_5MoeForCausalLM if cfg.is_moe else Qwen3_5ForCausalLM
    with torch.device("meta"):
        hf = cls(hcfg)
    state = model.state_dict()
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(
            f"parameter names differ from transformers': missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # buffers (rotary inv_freq) were created on meta: rebuild the rotary module for real
    dev = next(model.parameters()).device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg).to(dev)
    leftover = [n for n, t in (*hf.named_parameters(), *hf.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"transformers model still has meta tensors: {leftover[:5]}")
    hf.generation_config.pad_token_id = 0
    return hf.eval()


class _StepClock:
    """A stopping criterion that never stops: it timestamps each generated token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def hf_generate(
    hf: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
) -> tuple[torch.Tensor, list[float], float]:
    """Greedy `generate` of a static batch, left-padded, exactly max_new_tokens each (EOS
    ignored). Returns (new tokens [B, max_new_tokens], per-token timestamps, wall seconds)."""
    from transformers import StoppingCriteriaList

    dev = next(hf.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    clock = _StepClock()
    t0 = time.perf_counter()
    out = hf.generate(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # suppresses EOS: every row runs to the end
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    return out[:, width:].cpu(), [t0, *clock.times], wall
