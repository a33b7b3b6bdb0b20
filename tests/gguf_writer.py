"""Write a tiny checkpoint directory as a GGUF file the way llama.cpp's `convert_hf_to_gguf.py`
does for Qwen 3.5 (tensor names, metadata keys, and its edits: norm weights + 1, A_log ->
-exp(A_log), conv kernels squeezed, DeltaNet V heads tiled, experts split into gate / up, the MTP
layer as block num_hidden_layers), through the `gguf` package's writer and quantizers.

`tests/test_gguf.py test_writer_equals_llama_cpp_converter` checks that this file equals the
converter's own output (names, types, shapes, bytes) where the converter is at hand
(QWEN35_LLAMA_CPP_DIR), so the other tests can build GGUF files without llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def _tile(t: torch.Tensor, dim: int, k: int, r: int, head_dim: int) -> torch.Tensor:
    """V heads grouped by K head -> tiled (the converter's _reorder_v_heads)."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], k, r, head_dim, *shape[dim + 1 :])
    return t.transpose(dim, dim + 1).contiguous().reshape(shape)


_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_MTP = {"fc.weight": "nextn.eh_proj.weight", "pre_fc_norm_embedding.weight": "nextn.enorm.weight",
        "pre_fc_norm_hidden.weight": "nextn.hnorm.weight",
        "norm.weight": "nextn.shared_head_norm.weight"}  # fmt: skip


def write_gguf(
    src: Path,
    out: Path,
    qtype: str = "F32",
    tokens: list[str] | None = None,
    merges: list[str] | None = None,
    token_types: list[int] | None = None,
    chat_template: str | None = None,
    eos: int = 1,
    types: dict[str, str] | None = None,
) -> Path:
    """src: a checkpoint directory (tests/tiny.py save_checkpoint, layout "vlm", fused experts);
    qtype: the ggml type of the 2-D weights (F32, F16, BF16, Q8_0, Q4_0, Q5_1, ...; 1-D tensors
    stay F32 and the routers F32, as the converter keeps them); types: {GGUF tensor name: type}
    for some tensors (a mixed file, as llama-quantize's Q4_K_M)."""
    import gguf

    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    moe = bool(text.get("num_experts"))
    arch = "qwen35moe" if moe else "qwen35"
    n = text["num_hidden_layers"]
    n_mtp = text.get("mtp_num_hidden_layers", 0)
    k, v = text["linear_num_key_heads"], text["linear_num_value_heads"]
    dk, dv = text["linear_key_head_dim"], text["linear_value_head_dim"]
    r = v // k
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(n + n_mtp)
    w.add_context_length(text["max_position_embeddings"])
    w.add_embedding_length(text["hidden_size"])
    w.add_head_count(text["num_attention_heads"])
    w.add_head_count_kv(text["num_key_value_heads"])
    rope = text.get("rope_parameters", {})
    w.add_rope_freq_base(rope.get("rope_theta", 1e7))
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    w.add_key_length(text["head_dim"])
    w.add_value_length(text["head_dim"])
    if moe:
        w.add_expert_count(text["num_experts"])
        w.add_expert_used_count(text["num_experts_per_tok"])
        w.add_expert_feed_forward_length(text["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(text["shared_expert_intermediate_size"])
    else:
        w.add_feed_forward_length(text["intermediate_size"])
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_ssm_conv_kernel(text["linear_conv_kernel_dim"])
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(k)
    w.add_ssm_time_step_rank(v)
    w.add_ssm_inner_size(v * dv)
    kinds = text["layer_types"]
    w.add_array(f"{arch}.attention.recurrent_layers",
                [t == "linear_attention" for t in kinds] + [False] * n_mtp)  # fmt: skip
    w.add_full_attention_interval(4)
    w.add_rope_dimension_count(int(text["head_dim"] * rope.get("partial_rotary_factor", 0.25)))
    w.add_rope_dimension_sections(list(rope.get("mrope_section", [11, 11, 10])) + [0])
    vocab = text["vocab_size"]
    toks = tokens if tokens is not None else [f"<t{i}>" for i in range(vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(toks)
    w.add_token_types(token_types if token_types is not None else [1] * len(toks))
    w.add_token_merges(merges if merges is not None else ["<t0> <t1>"])
    w.add_eos_token_id(eos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    gen = src / "generation_config.json"  # its sampling, as the converter's metadata.py copies it
    if gen.is_file():
        g = json.loads(gen.read_text())
        for key, add in (("top_k", w.add_sampling_top_k), ("top_p", w.add_sampling_top_p),
                         ("min_p", w.add_sampling_min_p), ("temperature", w.add_sampling_temp),
                         ("repetition_penalty", w.add_sampling_penalty_repeat)):  # fmt: skip
            if g.get(key) is not None:
                add(g[key])

    q = gguf.GGMLQuantizationType[qtype]
    sd = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            sd.update({key: f.get_tensor(key).float() for key in f.keys()})

    def put(name: str, t: torch.Tensor, matrix_type: bool = True):
        a = t.contiguous().numpy().astype(np.float32)
        kind = q if (matrix_type and a.ndim >= 2) else gguf.GGMLQuantizationType.F32
        if types and name in types:
            kind = gguf.GGMLQuantizationType[types[name]]
        if a.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16  # (the converter's fallback)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)

    def edit(hf: str, t: torch.Tensor) -> torch.Tensor:
        if hf.endswith("A_log"):
            t = -torch.exp(t)
        if hf.endswith("conv1d.weight"):
            t = t.squeeze()
        if hf.endswith("norm.weight") and not hf.endswith("linear_attn.norm.weight"):
            t = t + 1
        if k != v and "linear_attn." in hf:
            if hf.endswith(("in_proj_qkv.weight", "conv1d.weight")):
                t = torch.cat([t[: 2 * k * dk], _tile(t[2 * k * dk :], 0, k, r, dv)])
            elif hf.endswith("in_proj_z.weight"):
                t = _tile(t, 0, k, r, dv)
            elif hf.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
                t = _tile(t, 0, k, r, 1)
            elif hf.endswith("out_proj.weight"):
                t = _tile(t, 1, k, r, dv)
        return t

    lm = "model.language_model." if any(s.startswith("model.language_model.") for s in sd) else (
        "model.")  # fmt: skip
    put("token_embd.weight", sd[lm + "embed_tokens.weight"])
    if "lm_head.weight" in sd:
        put("output.weight", sd["lm_head.weight"])
    put("output_norm.weight", sd[lm + "norm.weight"] + 1)
    layers = [(i, f"{lm}layers.{i}.") for i in range(n)]
    layers += [(n + j, f"mtp.layers.{j}.") for j in range(n_mtp)]
    for i, prefix in layers:
        for key in sorted(s for s in sd if s.startswith(prefix)):
            rest = key[len(prefix) :]
            t = edit(rest, sd[key])
            if rest == "mlp.experts.gate_up_proj":
                half = t.shape[1] // 2
                put(f"blk.{i}.ffn_gate_exps.weight", t[:, :half])
                put(f"blk.{i}.ffn_up_exps.weight", t[:, half:])
                continue
            f32 = rest in ("mlp.gate.weight", "mlp.shared_expert_gate.weight",
                           "linear_attn.conv1d.weight")  # fmt: skip
            put(f"blk.{i}.{_NAMES[rest]}", t, matrix_type=not f32)
    if n_mtp:
        for rest, g in _MTP.items():
            t = sd[f"mtp.{rest}"]
            put(f"blk.{n}.{g}", t + 1 if "norm" in rest else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_VISION = {"attn.qkv": "attn_qkv", "attn.proj": "attn_out", "mlp.linear_fc1": "ffn_up",
           "mlp.linear_fc2": "ffn_down", "norm1": "ln1", "norm2": "ln2"}  # fmt: skip
_VISION_TOP = {"merger.linear_fc1": "mm.0", "merger.linear_fc2": "mm.2", "merger.norm": "v.post_ln",
               "patch_embed.proj": "v.patch_embd", "pos_embed": "v.position_embd"}  # fmt: skip


def write_mmproj(src: Path, out: Path, qtype: str = "F32", eps: float = 1e-6) -> Path:
    """The vision tower of a VLM checkpoint directory as llama.cpp's `convert_hf_to_gguf.py
    --mmproj` writes it (Qwen3-VL's clip layout: the Conv3D patch kernel split per frame,
    matrices in qtype, 1-D tensors and the patch kernels F32, as the converter keeps them)."""
    import gguf

    cfg = json.loads((src / "config.json").read_text())
    v = cfg["vision_config"]
    pre = json.loads((src / "preprocessor_config.json").read_text())
    w = gguf.GGUFWriter(str(out), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", v["out_hidden_size"])
    side = int(v["num_position_embeddings"] ** 0.5 * v["patch_size"])
    w.add_uint32("clip.vision.image_size", side)
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.block_count", v["depth"])
    w.add_uint32("clip.vision.attention.head_count", v["num_heads"])
    w.add_array("clip.vision.image_mean", pre["image_mean"])
    w.add_array("clip.vision.image_std", pre["image_std"])
    w.add_string("clip.projector_type", "qwen3vl_merger")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.spatial_merge_size", v["spatial_merge_size"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
    w.add_array("clip.vision.is_deepstack_layers", [False] * v["depth"])
    q = gguf.GGMLQuantizationType[qtype]
    sd = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            sd.update({k: f.get_tensor(k).float() for k in f.keys() if ".visual." in k})
    for key in sorted(sd):
        rest = key.split(".visual.", 1)[1]
        base, _, leaf = rest.rpartition(".")
        a = sd[key].contiguous().numpy().astype(np.float32)
        if base == "patch_embed.proj" and leaf == "weight":
            half = qtype in ("F16", "BF16")
            for i, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
                x = np.ascontiguousarray(a[:, :, i])
                if half:
                    w.add_tensor(name, gguf.quants.quantize(x, q), raw_dtype=q)
                else:
                    w.add_tensor(name, x)
            continue
        if base.startswith("blocks."):
            _, i, inner = base.split(".", 2)
            name = f"v.blk.{i}.{_VISION[inner]}.{leaf}"
        else:
            name = f"{_VISION_TOP[base]}.{leaf}"
        kind = q if a.ndim >= 2 and base != "pos_embed" else gguf.GGMLQuantizationType.F32
        if kind != gguf.GGMLQuantizationType.F32 and a.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
