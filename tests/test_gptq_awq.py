"""GPTQ (GPTQModel / AutoGPTQ) and AWQ (AutoAWQ) checkpoints: written here by a packer of this
test's own, from the formats as their dequantizers read them (gptq_awq.py's docstring), since
neither library installs without CUDA; read back, the weights are (u - z) * scale exactly, int4
/ int8 storage keeps the codes, activation-ordered GPTQ groups load by their values."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35.config import ConfigError, ModelConfig
from qwen35.loader import load_model
from qwen35.quant.layers import Int4Linear, Int8Linear
from qwen35.weights import CheckpointError
from tiny import save_checkpoint

DENSE = dict(hidden_size=128, linear_key_head_dim=32, linear_value_head_dim=32,
             intermediate_size=256)  # fmt: skip
MOE = dict(hidden_size=128, linear_key_head_dim=32, linear_value_head_dim=32,
           moe_intermediate_size=128, shared_expert_intermediate_size=128)  # fmt: skip
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _quantized(key: str) -> bool:
    module = key.removesuffix(".weight")
    return (key.startswith("model.language_model.layers.") and key.endswith(".weight")
            and "proj" in module.rsplit(".", 1)[-1]
            and not re.search(r"in_proj_[ab]$|mlp\.gate$|shared_expert_gate$", module))  # fmt: skip


def _words(u: np.ndarray, bits: int, order=None) -> np.ndarray:
    """Codes [rows, n] (n % (32 / bits) == 0) packed along the last axis into int32 words: code
    i of a word (order[i] of its n's, AWQ) at bits * i."""
    per = 32 // bits
    v = u.astype(np.uint64).reshape(u.shape[0], -1, per)
    if order is not None:
        v = v[:, :, order]
    w = sum((v[:, :, i] & ((1 << bits) - 1)) << (bits * i) for i in range(per))
    return w.astype(np.uint32).view(np.int32)


def quantize(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx=None):
    """w [out, in] -> u [out, in], z [groups, out], scale [groups, out] fp16 (min / max)."""
    out, inp = w.shape
    g_idx = torch.arange(inp) // group if g_idx is None else g_idx
    groups = int(g_idx.max()) + 1
    top = (1 << bits) - 1
    z = torch.empty(groups, out)
    s = torch.empty(groups, out)
    for g in range(groups):
        v = w[:, g_idx == g]
        if sym:
            s[g] = v.abs().amax(1).clamp(min=1e-8) / ((top + 1) // 2 - 0.5)
            z[g] = (top + 1) // 2
        else:
            lo, hi = v.amin(1).clamp(max=0), v.amax(1).clamp(min=0)
            s[g] = ((hi - lo) / top).clamp(min=1e-8)
            z[g] = (-lo / s[g]).round().clamp(0, top)
    s = s.half()
    sc, zc = s.float()[g_idx].t(), z[g_idx].t()  # [out, in]
    u = (w / sc).round().add(zc).clamp(0, top)
    return u.to(torch.int64), z.to(torch.int64), s


def write(src, dst, fmt: str, bits=4, group=32, sym=True, act_order=False, v2=False):
    """src (a tiny checkpoint) in GPTQ / AWQ form; returns {key: the stored values (fp32)}."""
    dst.mkdir(parents=True)
    out_sd, want = {}, {}
    g = torch.Generator().manual_seed(3)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for k in f.keys():
            w = f.get_tensor(k).to(torch.bfloat16)
            if not _quantized(k):
                out_sd[k] = w
                continue
            base, w = k.removesuffix(".weight"), w.float()
            inp = w.shape[1]
            gsize = inp if group == -1 else group
            g_idx = (torch.randperm(inp, generator=g) // gsize if act_order else None)
            u, z, s = quantize(w, bits, gsize, sym, g_idx)
            gi = torch.arange(inp) // gsize if g_idx is None else g_idx
            want[k] = (u - z[gi].t()).float() * s.float()[gi].t()
            if fmt == "awq":
                out_sd[base + ".qweight"] = torch.from_numpy(_words(u.t().numpy(), 4, AWQ_ORDER))
                out_sd[base + ".qzeros"] = torch.from_numpy(_words(z.numpy(), 4, AWQ_ORDER))
            else:
                out_sd[base + ".qweight"] = torch.from_numpy(
                    np.ascontiguousarray(_words(u.numpy(), bits).T))  # along the input
                zs = z if v2 else z - 1  # (the original format stores z - 1)
                out_sd[base + ".qzeros"] = torch.from_numpy(_words(zs.numpy(), bits))
                out_sd[base + ".g_idx"] = gi.to(torch.int32)
            out_sd[base + ".scales"] = s
    save_file({k: v.contiguous() for k, v in out_sd.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": not sym,
              "version": "gemm"}  # fmt: skip
    else:
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
              "desc_act": act_order, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    return want


CASES = {  # name: (write's options, moe)
    "gptq-4bit-g32": (dict(fmt="gptq"), False),
    "gptq-4bit-asym-v2": (dict(fmt="gptq", sym=False, group=128, v2=True), False),
    "gptq-4bit-moe": (dict(fmt="gptq", sym=False, group=64), True),
    "gptq-8bit-channel": (dict(fmt="gptq", bits=8, group=-1), False),
    "gptq-act-order": (dict(fmt="gptq", act_order=True, group=64), False),
    "awq": (dict(fmt="awq", sym=False, group=64), False),
    "awq-moe": (dict(fmt="awq", sym=False, group=32), True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    opts, moe = CASES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    save_checkpoint(base / "src", moe=moe, experts="per_expert" if moe else "fused",
                    **(MOE if moe else DENSE))  # fmt: skip
    return request.param, base / "q", write(base / "src", base / "q", **opts)


def test_weights_read_as_stored(case):
    from qwen35.gptq_awq import GptqAwqCheckpoint

    name, d, want = case
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        ck = GptqAwqCheckpoint(f, d / "model.safetensors")
        assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in ck.keys())
        for k, w in want.items():
            got = ck.get_tensor(k)
            assert got.dtype == torch.float16 and torch.equal(got, w.half()), k
    assert len(want) >= 8


def test_int_storage_keeps_the_codes(case):
    """int4 (int8 for 8-bit) holds exactly the stored values (fp32 model: scales unrounded);
    activation-ordered groups have no lattice of consecutive inputs: quantized from the values,
    close to them."""
    name, d, want = case
    fmt = "int8" if "8bit" in name else "int4"
    mods = dict(load_model(d, dtype="fp32", quantization=fmt).named_modules())
    checked = 0
    for k, w in want.items():
        name_ = k.replace("model.language_model.", "model.").removesuffix(".weight")
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", name_)
        if m:
            ex, e = mods[m[1]], int(m[2])
            lin = (ex.down_q if m[3] == "down" else ex.gate_up_q)[e]
            got = lin.dequantized(torch.float32)
            if m[3] != "down":
                half = got.shape[0] // 2
                got = got[:half] if m[3] == "gate" else got[half:]
        elif (lin := mods.get(name_)) is not None:
            got = lin.dequantized(torch.float32)
        else:
            continue  # (packed with its siblings)
        assert isinstance(lin, Int8Linear if fmt == "int8" else Int4Linear), k
        if "act-order" in name:
            assert (got - w).abs().max() <= (w.abs().max() / 7.5), k
        else:
            assert torch.equal(got, w), (k, (got - w).abs().max())
        checked += 1
    assert checked >= 6


def test_logits_equal_the_stored_values(case, tmp_path):
    """In the model dtype (fp32) the checkpoint is the model of its stored values."""
    from qwen35.gptq_awq import GptqAwqCheckpoint

    name, d, _ = case
    plain = tmp_path / "plain"
    plain.mkdir()
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        ck = GptqAwqCheckpoint(f, d / "model.safetensors")
        save_file({k: ck.get_tensor(k).contiguous() for k in ck.keys()},
                  str(plain / "model.safetensors"))  # fmt: skip
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_model(d, dtype="fp32")(ids), load_model(plain, dtype="fp32")(ids))


def assert_refused(d, config_edits, tensor_edits) -> None:
    """A quantized checkpoint directory d refused with the reason: each (quantization_config
    edit, message) by ModelConfig.from_hf, then each (state dict -> broken state dict, message)
    by load_model; d is left as the last broken form (tests/test_compressed_tensors.py's too)."""
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    for edit, says in config_edits:
        (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**qc, **edit}}))
        with pytest.raises(ConfigError, match=says):
            ModelConfig.from_hf(d)
    (d / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for edit, says in tensor_edits:
        save_file(edit(sd), str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=says):
            load_model(d, dtype="fp32")


def test_unread_forms_are_refused(tmp_path):
    save_checkpoint(tmp_path / "src", **DENSE)
    d = tmp_path / "q"
    write(tmp_path / "src", d, fmt="gptq")

    def key(sd, suffix="scales"):
        return next(k for k in sd if k.endswith("q_proj.scales")).replace("scales", suffix)

    assert_refused(d, (({"bits": 3}, "4 or 8 bits"), ({"checkpoint_format": "marlin"}, "gptq_v2"),
                       ({"group_size": 48}, "multiple of 32"),
                       ({"quant_method": "awq", "version": "gemv"}, "gemm")),
                   ((lambda sd: {k: v for k, v in sd.items() if k != key(sd)}, "no scales"),
                    (lambda sd: {**sd, key(sd): sd[key(sd)][:1]}, "not a GPTQ layout"),
                    (lambda sd: {**sd, key(sd, "g_idx"): sd[key(sd, "g_idx")] + 1000},
                     "does not map")))  # fmt: skip


def test_fp8_holds_groups_of_128_exactly(tmp_path, monkeypatch):
    """A GPU's default storage of a 4-bit checkpoint in groups of 128: FP8 in blocks of one row
    (e4m3 u - z times the group's scale), exactly its values, made from the codes alone (the
    values are never read)."""
    from qwen35.gptq_awq import GptqAwqCheckpoint
    from qwen35.loader import auto_quantization
    from qwen35.quant.layers import Fp8Linear

    save_checkpoint(tmp_path / "src", **DENSE)
    want = write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=128)
    assert auto_quantization(str(tmp_path / "q"), "auto", "auto", "cuda:0") == "fp8"
    read, get = [], GptqAwqCheckpoint.get_tensor
    monkeypatch.setattr(GptqAwqCheckpoint, "get_tensor",
                        lambda self, k: read.append(k) or get(self, k))  # fmt: skip
    mods = dict(load_model(tmp_path / "q", dtype="fp32", quantization="fp8").named_modules())
    assert read and not set(read) & set(want)
    checked = 0
    for k, w in want.items():
        lin = mods.get(k.replace("model.language_model.", "model.").removesuffix(".weight"))
        if isinstance(lin, Fp8Linear):
            assert lin.block == (1, 128) and torch.equal(lin.dequantized(torch.float32), w), k
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("opts", [dict(fmt="gptq", group=32), dict(fmt="awq", sym=False, group=64),
                                  dict(fmt="gptq", bits=8, group=-1)])  # fmt: skip
def test_plan_counts_the_checkpoint_as_the_engine_holds_it(opts, tmp_path, capsys):
    """`qwen35 plan -m DIR --dtype int4`: the checkpoint's 4-bit matrices in int4 groups of its
    own group size (32 costs more than the name's groups of 128), 8-bit ones in int8 rows: the
    weights byte for byte as the engine holds them."""
    from qwen35.cli import main

    save_checkpoint(tmp_path / "src", moe=True, experts="per_expert", **MOE)
    write(tmp_path / "src", tmp_path / "q", **opts)
    assert main(["plan", "-m", str(tmp_path / "q"), "--dtype", "int4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"]
    m = load_model(tmp_path / "q", dtype="bf16", quantization="int4")
    assert row["weights_bytes"]["int4"] == sum(p.numel() * p.element_size()
                                               for p in m.parameters())  # fmt: skip


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_moe_experts_made_from_codes_alone(tmp_path, monkeypatch, fmt):
    """A MoE checkpoint's per-expert 4-bit slices under int4, or FP8 in one-row blocks (a GPU's
    default: held exactly): read by their codes alone (their values, ~1 ms of dequantizing each
    of 35B-A3B's 30,720, are never read: weights.read_into skips them), the same model as
    reading them; and where one slice has no codes (an activation-ordered expert: read by its
    values), the skipped slices' values are read after all (weights._read_values) and the
    model equals the all-values load again."""
    from safetensors.torch import load_file, save_file

    from qwen35.gptq_awq import GptqAwqCheckpoint
    from qwen35.quant.apply import QuantizeOnRead

    save_checkpoint(tmp_path / "src", moe=True, experts="per_expert", **MOE)
    want = write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=32)
    experts = {k for k in want if ".experts." in k}
    read, get = [], GptqAwqCheckpoint.get_tensor
    monkeypatch.setattr(GptqAwqCheckpoint, "get_tensor",
                        lambda self, k: read.append(k) or get(self, k))  # fmt: skip

    def both(d):
        read.clear()
        fast = load_model(d, dtype="fp32", quantization=fmt).state_dict()
        seen = set(read)
        with monkeypatch.context() as m:
            m.setattr(QuantizeOnRead, "skips_values", lambda *a, **k: False)
            slow = load_model(d, dtype="fp32", quantization=fmt).state_dict()
        assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast)
        return seen

    assert experts and not both(tmp_path / "q") & experts
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    key = next(k for k in sorted(sd) if ".experts.1.up_proj.g_idx" in k)
    sd[key] = sd[key][torch.randperm(sd[key].numel(), generator=torch.Generator().manual_seed(0))]
    save_file(sd, str(tmp_path / "q" / "model.safetensors"))
    seen = both(tmp_path / "q")  # (that layer's gate_up slices read by their values)
    layer = key.split(".experts.")[0]
    assert {k for k in experts if k.startswith(layer) and "down" not in k} <= seen


def test_quantized_lm_head_is_read_by_value(tmp_path, monkeypatch):
    """A GPTQ checkpoint whose lm_head is quantized too (AutoGPTQ's lm_head=True): under int4
    the head is made from its values (quantize_vocab_: int6), never from codes it skipped
    reading (its parameter would hold no values); the logits follow the checkpoint's."""
    import test_gptq_awq as me

    quantized = me._quantized
    monkeypatch.setattr(me, "_quantized", lambda k: quantized(k) or k == "lm_head.weight")
    save_checkpoint(tmp_path / "src", tie_word_embeddings=False, **DENSE)
    want = write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=32)
    assert "lm_head.weight" in want
    ids = torch.randint(0, 256, (1, 12))
    ref = load_model(tmp_path / "q", dtype="fp32")(ids)  # the checkpoint's values, fp32
    got = load_model(tmp_path / "q", dtype="fp32", quantization="int4")(ids)
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 0.1


def test_hints_move_to_the_loads_device(tmp_path, monkeypatch):
    """The source's hints (codes and scales, read on the CPU) reach the module builders on the
    load's device (quant/apply.py `_on`): a GPU load made CPU modules inside a GPU model before
    (FP8-exact and int4 alike). Here: every hinted module's hints pass through `_on` with the
    load's device, and `_on` moves every tensor of a hint (meta stands for a GPU)."""
    from qwen35.quant import apply
    from qwen35.quant.formats import Int8Rows, Lattice

    seen, on = [], apply._on
    monkeypatch.setattr(apply, "_on", lambda h, d: seen.append((type(h).__name__, d)) or on(h, d))
    save_checkpoint(tmp_path / "src", moe=True, experts="per_expert", **MOE)
    write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=32)
    load_model(tmp_path / "q", dtype="fp32", quantization="int4")
    assert seen and {d for _, d in seen} == {torch.device("cpu")}
    assert {n for n, _ in seen} == {"Lattice"}
    meta = torch.device("meta")
    moved = on(Lattice(torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 32, dtype=torch.uint8)),
               meta)  # fmt: skip
    assert all(t.device == meta for t in moved)
    assert on(Int8Rows(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2)), meta).q.is_meta
    assert on(Lattice(torch.ones(2, 1), torch.zeros(2, 1), None), meta).codes is None
    assert on("int8", meta) == "int8"
