"""compressed-tensors checkpoints (llm-compressor's format: RedHatAI's Qwen3.5 w4a16 / w8a8 /
FP8-dynamic releases), written here by the compressed-tensors library itself from a tiny random
checkpoint: the weights read back equal the library's own decompression, int4 / int8 storage
keeps the stored codes (no second quantization), dense and MoE per-expert, and what the engine
does not read is refused with the reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35.loader import load_model
from qwen35.quant.layers import Int4Linear, Int8Linear, IntExperts
from tiny import save_checkpoint

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (the test extra)")

DIMS = dict(hidden_size=128, linear_key_head_dim=32, linear_value_head_dim=32)
DENSE = dict(DIMS, intermediate_size=256)
MOE = dict(DIMS, moe_intermediate_size=128, shared_expert_intermediate_size=128)
# what RedHatAI's recipes leave in BF16: the head, routers, DeltaNet's a / b, the tower, MTP
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$", "re:.*in_proj_[ab]$",
          "re:.*visual.*", "re:mtp.*"]  # fmt: skip


def _quantized(key: str) -> bool:
    if not key.endswith(".weight") or not key.startswith("model.language_model.layers."):
        return False
    module = key.removesuffix(".weight")
    return not any(re.match(p[3:], module) for p in IGNORE if p.startswith("re:")) and \
        ("proj" in module.rsplit(".", 1)[-1])  # fmt: skip


def compress(src: Path, dst: Path, weights: dict, fmt: str) -> dict[str, torch.Tensor]:
    """src (a tiny checkpoint) as compressed-tensors writes it: scales and zero points by the
    library's min / max (calculate_qparams), each weight through its compressor, its
    quantization_config in config.json. Returns the library's decompression of each quantized
    weight (fp32 scales: exact)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORE, format=fmt,
                                quantization_status="compressed")  # fmt: skip
    comp = BaseCompressor.get_value_from_registry(fmt)
    dst.mkdir(parents=True)
    out, want = {}, {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for k in f.keys():
            w = f.get_tensor(k)
            if not _quantized(k):
                out[k] = w.to(torch.bfloat16)
                continue
            base = k.removesuffix(".weight")
            w = w.to(torch.bfloat16).float()
            if args.strategy == "group":
                v = w.view(w.shape[0], -1, args.group_size)
                lo, hi = v.amin(-1), v.amax(-1)
            elif args.strategy == "block":  # 128 x 128, the last ones partial
                n, m = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
                v = torch.nn.functional.pad(w, (0, m * 128 - w.shape[1], 0, n * 128 - w.shape[0]))
                v = v.view(n, 128, m, 128)
                lo, hi = v.amin((1, 3)), v.amax((1, 3))
            elif args.strategy == "channel":
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            else:  # tensor
                lo, hi = w.min().reshape(1), w.max().reshape(1)
            scale, zp = calculate_qparams(lo, hi, args)
            scale = scale.to(torch.bfloat16)  # (stored in the weights' dtype)
            state = {"weight": w, "weight_scale": scale.float()}
            if not args.symmetric:
                state["weight_zero_point"] = zp.to(torch.int8)
            packed = comp.compress(state, scheme)
            want[k] = comp.decompress({**packed, "weight_scale": scale.float()}, scheme)["weight"]
            packed["weight_scale"] = scale
            out.update({f"{base}.{n}": t.contiguous() for n, t in packed.items()})
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = config.model_dump()
    (dst / "config.json").write_text(json.dumps(cfg))
    return want


W4 = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
CASES = {  # name: (weights, format, moe)
    "w4a16": (W4, "pack-quantized", False),
    "w4a16-asym-g32": (dict(W4, symmetric=False, group_size=32), "pack-quantized", False),
    "w4a16-channel": (dict(W4, strategy="channel", group_size=None), "pack-quantized", False),
    "w4a16-moe": (dict(W4, group_size=64), "pack-quantized", True),
    "w4a16-moe-g128": (dict(W4, symmetric=False), "pack-quantized", True),
    "w8a16": (dict(W4, num_bits=8, strategy="channel", group_size=None), "pack-quantized",
              False),  # fmt: skip
    "w8a8": (dict(W4, num_bits=8, strategy="channel", group_size=None), "int-quantized", True),
    "fp8-dynamic": (dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
                    "float-quantized", False),  # fmt: skip
    "fp8-block": (dict(num_bits=8, type="float", symmetric=True, strategy="block",
                       block_structure=[128, 128]), "float-quantized", True),  # fmt: skip
    "fp8-dynamic-moe": (dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
                        "float-quantized", True),  # fmt: skip
}


def _build(name: str, base: Path):
    weights, fmt, moe = CASES[name]
    save_checkpoint(base / "src", moe=moe, experts="per_expert" if moe else "fused",
                    **(MOE if moe else DENSE))  # fmt: skip
    return name, base / "ct", compress(base / "src", base / "ct", weights, fmt)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=[n for n in CASES if not n.startswith("fp8")])
def int_case(request, tmp_path_factory):  # (FP8 is no integer format: int8 / int4 requantize it)
    return _build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=["w4a16", "w8a8"])
def sym_case(request, tmp_path_factory):  # (symmetric, one 4-bit and one 8-bit)
    return _build(request.param, tmp_path_factory.mktemp("sym-" + request.param))


@pytest.fixture(scope="module")
def moe_w4(tmp_path_factory):
    return _build("w4a16-moe", tmp_path_factory.mktemp("moe-w4"))


def test_weights_read_as_the_library_decompresses_them(case):
    from qwen35.compressed_tensors import CompressedCheckpoint

    name, d, want = case
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        ck = CompressedCheckpoint(f, d / "model.safetensors")
        aux = ("_packed", "_scale", "_shape", "_zero_point")
        assert not any(k.endswith(aux) for k in ck.keys())
        for k, w in want.items():
            got = ck.get_tensor(k)
            if got.dtype == torch.float8_e4m3fn:  # blocks: presented as the official FP8 layout
                from qwen35.quant.formats import dequantize_fp8_blocks

                scale = ck.get_tensor(k + "_scale_inv")
                block = (128, 128) if name == "fp8-block" else (1, 128)
                got = dequantize_fp8_blocks(got, scale, torch.bfloat16, block)
            assert ck.get_slice(k).get_shape() == list(w.shape), k
            assert got.dtype == torch.bfloat16 and torch.equal(got, w.to(got.dtype)), k
        assert len(want) >= 8


def test_int_storage_keeps_the_stored_codes(int_case):
    """int4 (4-bit) / int8 (8-bit per channel) hold exactly the checkpoint's values: each int
    module's dequantized weight equals the library's decompression (fp32 scales here)."""
    name, d, want = int_case
    fmt = "int4" if "w4" in name else "int8"
    model = load_model(d, dtype="fp32", quantization=fmt)
    mods = dict(model.named_modules())
    checked = 0
    for k, w in want.items():
        name_ = k.replace("model.language_model.", "model.").removesuffix(".weight")
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", name_)
        if m:
            ex = mods[m[1]]
            assert isinstance(ex, IntExperts)
            e, part = int(m[2]), m[3]
            lin = (ex.down_q if part == "down" else ex.gate_up_q)[e]
            got = lin.dequantized(torch.float32)
            if part != "down":
                half = got.shape[0] // 2
                got = got[:half] if part == "gate" else got[half:]
        else:
            lin = mods.get(name_)
            if lin is None:  # packed with a sibling (q, k, v / gate, up): its rows of the pack
                continue
            got = lin.dequantized(torch.float32)
        assert isinstance(lin, Int4Linear if fmt == "int4" else Int8Linear), (k, type(lin))
        if fmt == "int4":
            assert lin.group == CASES[name][0].get("group_size") or 128
        assert torch.equal(got, w), (k, (got - w).abs().max())
        checked += 1
    assert checked >= 6


def test_logits_equal_the_decompressed_checkpoint(case, tmp_path):
    """Stored in the model dtype (fp32), the compressed checkpoint is the model its
    decompression describes: the same logits as a plain checkpoint of those weights."""
    name, d, want = case
    plain = tmp_path / "plain"
    plain.mkdir()
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        from qwen35.compressed_tensors import CompressedCheckpoint
        from qwen35.quant.formats import dequantize_fp8_blocks

        ck = CompressedCheckpoint(f, d)
        sd = {k: ck.get_tensor(k) for k in ck.keys()}
        block = (128, 128) if name == "fp8-block" else (1, 128)
        for k in [k for k in sd if k.endswith("_scale_inv")]:  # FP8 blocks, values written out
            w = k.removesuffix("_scale_inv")
            sd[w] = dequantize_fp8_blocks(sd[w], sd.pop(k), torch.float32, block)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(plain / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    m = load_model(d, dtype="fp32")
    a, b = m(ids), load_model(plain, dtype="fp32")(ids)
    if name.startswith("fp8"):  # kept in FP8 (the official layout's modules), its kernel's sums
        from qwen35.quant.layers import Fp8Experts, Fp8Linear

        assert any(isinstance(x, Fp8Linear) for x in m.modules())
        assert any(isinstance(x, Fp8Experts) for x in m.modules()) == CASES[name][2]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(a, b)


def test_cpu_default_storage_follows_the_checkpoint(case, capsys):
    """`--dtype auto` on a CPU holds the checkpoint as stored (int4 / int8), and `qwen35 plan
    --cpu-memory` plans and launches it so."""
    from qwen35.cli import main
    from qwen35.loader import auto_quantization

    name, d, _ = case
    want = {"w4": "int4", "w8": "int8", "fp": "int8"}[name[:2]]
    want = None if name.startswith("fp8") else want  # (kept FP8, as the official layout)
    assert auto_quantization(str(d), "auto", "auto", "cpu") == want
    assert auto_quantization(str(d), "auto", "bf16", "cpu") is None  # a dtype asked: as stored
    assert main(["plan", "-m", str(d), "--cpu-memory", "4"]) == 0
    out = capsys.readouterr().out
    assert (f"--quantization {want}" if want else "--dtype bf16") in out


def test_unreadable_checkpoints_are_refused_with_the_reason(tmp_path):
    from test_gptq_awq import assert_refused

    save_checkpoint(tmp_path / "src", **DENSE)
    d = tmp_path / "ct"
    compress(tmp_path / "src", d, W4, "pack-quantized")

    def key(sd, suffix="_shape"):  # (a packed q_proj's)
        return next(k for k in sd if k.endswith("q_proj.weight_shape")).replace("_shape", suffix)

    assert_refused(d, (
        ({"format": "nvfp4-pack-quantized"}, "NVFP4"),
        ({"config_groups": {"g": {"weights": dict(W4, num_bits=2)}}}, "2 bits"),
        ({"config_groups": {"g": {"weights": dict(W4, group_size=48)}}}, "multiple of 32"),
        ({"transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "QuIP"),
    ), (  # tensors: a packed weight without its shape, a scale of the wrong shape
        (lambda sd: {k: v for k, v in sd.items() if k != key(sd)}, "no weight_shape"),
        (lambda sd: {**sd, key(sd, "_scale"): torch.ones(3, 1)}, "weight_scale"),
    ))  # fmt: skip


def test_quantize_writes_it_as_a_plain_checkpoint(moe_w4, tmp_path):
    """`qwen35 quantize CT_DIR OUT --to bf16`: the decompressed weights as a BF16 release (no
    quantization_config), which loads as the compressed checkpoint's values."""
    from qwen35.quant.checkpoint import convert_checkpoint

    name, d, want = moe_w4
    out = tmp_path / "bf16"
    convert_checkpoint(d, out, "bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        for k, w in want.items():
            assert torch.equal(f.get_tensor(k), w.to(torch.bfloat16)), k


def test_the_engine_serves_it_as_stored(moe_w4):
    """LLM(DIR) on a CPU with --dtype auto: int4 from the stored codes, and greedy tokens of a
    batch equal each prompt's alone; vLLM's `--quantization compressed-tensors` is `as stored`."""
    from qwen35 import LLM, SamplingParams
    from qwen35.engine.config import EngineConfig

    name, d, _ = moe_w4
    assert EngineConfig.create(str(d), quantization="compressed-tensors").load.quantization is None
    llm = LLM(str(d), max_model_len=256, max_num_seqs=4, max_memory="256MiB")
    assert llm.engine.engine_config.load.quantization == "int4"
    assert any(isinstance(m, IntExperts) for m in llm.engine.model.modules())
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert together == alone and all(len(t) == 6 for t in together)


def test_plan_reads_a_hub_repository_config_from_the_cache(moe_w4, tmp_path, monkeypatch,
                                                            capsys):  # fmt: skip
    """`qwen35 plan -m USER/REPO` (not a catalog name): the repository's config.json from the
    Hugging Face cache, never the network; not cached: how to fetch just the config."""
    from qwen35.cli import main

    name, d, _ = moe_w4
    repo = tmp_path / "hub" / "models--RedHatAI--Qwen3.5-9B-quantized.w4a16"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text((d / "config.json").read_text())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "-m", "RedHatAI/Qwen3.5-9B-quantized.w4a16", "--cpu-memory", "4"]) == 0
    assert "--quantization int4" in capsys.readouterr().out
    assert main(["plan", "-m", "RedHatAI/Qwen3.5-4B-quantized.w4a16"]) == 2
    assert "hf download RedHatAI/Qwen3.5-4B-quantized.w4a16 config.json" in capsys.readouterr().err


def test_older_writers_zero_points_and_kv_scales(sym_case, tmp_path):
    """A symmetric checkpoint that stores all-zero zero points (older llm-compressor) keeps its
    codes as well; an attention layer's calibrated KV-cache scales (kv_cache_scheme) are not
    weights of the model and are not read."""
    name, d, want = sym_case
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for k in [k for k in sd if k.endswith(".weight_scale")]:
        sd[k.replace("_scale", "_zero_point")] = torch.zeros(sd[k].shape, dtype=torch.int8)
    for k in [k for k in sd if k.endswith("self_attn.k_proj.weight_scale")]:
        sd[k.replace("k_proj.weight_scale", "k_scale")] = torch.ones(1)
        sd[k.replace("k_proj.weight_scale", "v_scale")] = torch.ones(1)
    old = tmp_path / "old"
    old.mkdir()
    save_file(sd, str(old / "model.safetensors"))
    (old / "config.json").write_text((d / "config.json").read_text())
    fmt = "int4" if name == "w4a16" else "int8"
    a = load_model(old, dtype="fp32", quantization=fmt).state_dict()
    b = load_model(d, dtype="fp32", quantization=fmt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["w4a16", "w4a16-moe-g128", "w4a16-asym-g32", "w4a16-moe",
                                  "w4a16-channel"])  # fmt: skip
def test_fp8_holds_4bit_values_exactly(name, tmp_path):
    """FP8 in blocks of one row and the group's inputs (32, 64; 128 for groups of 128k and per
    channel) holds 4-bit weights exactly: e4m3 (u - z) times the group's scale (a GPU's default
    storage for them, about half BF16's bytes)."""
    from qwen35.loader import auto_quantization
    from qwen35.quant.layers import Fp8Experts, Fp8Linear

    _, d, want = _build(name, tmp_path)
    width = {"w4a16-asym-g32": 32, "w4a16-moe": 64}.get(name, 128)
    assert auto_quantization(str(d), "auto", "auto", "cuda") == "fp8"
    mods = dict(load_model(d, dtype="fp32", quantization="fp8").named_modules())
    checked = 0
    for k, w in want.items():
        name_ = k.replace("model.language_model.", "model.").removesuffix(".weight")
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", name_)
        if m:
            ex, e = mods[m[1]], int(m[2])
            assert isinstance(ex, Fp8Experts) and ex.block == (1, width)
            gu, dn = ex.dequantized(torch.float32)
            I = gu.shape[1] // 2
            got = dn[e] if m[3] == "down" else gu[e, :I] if m[3] == "gate" else gu[e, I:]
        elif isinstance(lin := mods.get(name_), Fp8Linear):
            assert lin.block == (1, width)
            got = lin.dequantized(torch.float32)
        else:
            continue
        assert torch.equal(got, w), (k, (got - w).abs().max())
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("name,fmt", [("w4a16-asym-g32", "fp8"), ("w4a16-moe-g128", "fp8"),
                                      ("fp8-dynamic-moe", "fp8"), ("w4a16-asym-g32", "int4"),
                                      ("w4a16-moe", "int4")])  # fmt: skip
def test_engine_memory_equals_the_planners(name, fmt, tmp_path):
    """The weights the engine holds equal the planner's figure (plan.params.weight_bytes: what
    `plan --gpu` counts a GPU's weights with) within 1%: FP8 in one-row blocks with their fp32
    scales (4 / 32 bytes a weight at groups of 32: left out before, 12% of the weights' bytes),
    a compressed-tensors FP8 checkpoint's per-channel scales, and int4 in the stored groups."""
    from qwen35.plan.params import weight_bytes

    _, d, _ = _build(name, tmp_path)
    m = load_model(d, dtype="bf16", quantization=fmt)
    got = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values())
    want = weight_bytes(m.config, fmt, text_only=True)
    assert abs(got - want) / want < 0.01, (got, want)


def test_gpu_plan_holds_it_as_the_engine_does(tmp_path, capsys):
    """`qwen35 plan -m DIR --gpu ...` of a 4-bit checkpoint in groups of 128: planned in FP8 (as
    the engine holds it on a GPU), launch lines naming the directory, no --quantization (every
    engine reads the checkpoint's own)."""
    from qwen35.cli import main

    _, d, _ = _build("w4a16", tmp_path)
    assert main(["plan", "-m", str(d), "--gpu", "H100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    launch = out["recommendation"]["launch"]
    assert out["recommendation"]["dtype"] == "fp8", out["recommendation"]
    assert all(f" {d} " in cmd and "--quantization" not in cmd for cmd in launch.values()), launch


@pytest.mark.parametrize("to", ["int4", "int8"])
@pytest.mark.parametrize("moe,experts", [(False, "fused"), (True, "fused"), (True, "per_expert")])
def test_quantize_writes_compressed_tensors(to, moe, experts, tmp_path):
    """`qwen35 quantize DIR OUT --to int4 | int8`: compressed-tensors' pack-quantized layout,
    which the library itself reads (its config validates, its decompression of each module is
    what the engine reads; given our scales it packs the source weights into the same words),
    within a step of the source weights; fused experts written per
    expert, as llm-compressor names them; the MTP head, routers and in_proj_a/b stay BF16."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from qwen35.compressed_tensors import CompressedCheckpoint
    from qwen35.quant.checkpoint import convert_checkpoint

    save_checkpoint(tmp_path / "src", moe=moe, experts=experts, mtp=True,
                    **(MOE if moe else DENSE))  # fmt: skip
    out = convert_checkpoint(tmp_path / "src", tmp_path / "q", to)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    scheme = config.config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        src = {k: f.get_tensor(k) for k in f.keys()}
    (shard,) = out.glob("model-*.safetensors")
    with safe_open(str(shard), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        ck = CompressedCheckpoint(f, shard)
        bases = sorted(k.removesuffix(".weight_packed") for k in stored
                       if k.endswith(".weight_packed"))  # fmt: skip
        assert len(bases) >= 8 and not any(b.startswith("mtp.") or "in_proj_a" in b or
                                           b.endswith("mlp.gate") for b in bases)  # fmt: skip
        for b in bases:
            parts = {n: stored[f"{b}.{n}"] for n in ("weight_packed", "weight_scale",
                     "weight_shape", "weight_zero_point") if f"{b}.{n}" in stored}  # fmt: skip
            parts["weight_scale"] = parts["weight_scale"].float()
            want = comp.decompress(parts, scheme)["weight"]
            assert torch.equal(ck.get_tensor(b + ".weight").float(),
                               want.to(torch.bfloat16).float()), b  # fmt: skip
            m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", b)
            if m and experts == "fused":
                w = src[m[1] + (".down_proj" if m[3] == "down" else ".gate_up_proj")][int(m[2])]
                w = w.chunk(2)[0 if m[3] == "gate" else 1] if m[3] != "down" else w
            else:
                w = src[b + ".weight"]
            # the library, given our scales and zero points, packs the source weight alike
            state = {"weight": w.float(), "weight_scale": parts["weight_scale"]}
            if "weight_zero_point" in parts:
                state["weight_zero_point"] = ck._codes(b + ".weight")[2].to(torch.int8)
            again = comp.compress(state, scheme)
            assert torch.equal(again["weight_packed"], parts["weight_packed"]), b
            if "weight_zero_point" in parts:
                assert torch.equal(again["weight_zero_point"], parts["weight_zero_point"]), b
            step = parts["weight_scale"].repeat_interleave(w.shape[1] // parts[
                "weight_scale"].shape[1], 1)  # fmt: skip
            assert ((want - w.float()).abs() <= step).all(), b  # (an extreme clamped: a step)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    b = load_model(tmp_path / "src", dtype="fp32")(ids)

    def err(model):  # per position (a MoE's routing may flip a near tie at a position or two)
        a = model(ids)
        return ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten().median().item()

    # as near the source as the engine's own int4 / int8 of it (asymmetric groups of 128 with
    # free zero points; per-row int8): random tiny weights, int4 ~0.17, int8 ~0.014
    ours = err(load_model(out, dtype="fp32", quantization=to))
    in_memory = err(load_model(tmp_path / "src", dtype="fp32", quantization=to))
    assert ours <= 1.25 * in_memory + 0.005, (ours, in_memory)


def test_two_ranks_equal_one_process(tmp_path):
    """Under -tp 2 each rank reads its slices of the decompressed values (fp32 here: the values
    as they are; int4 / int8 would quantize each shard's values again): the same greedy tokens
    as one process, logits to summation order."""
    from test_parallel_engine import run

    _, d, _ = _build("w4a16-moe-g128", tmp_path)
    ref_tokens, ref_logits, _ = run(d)
    tokens, logits, _ = run(d, tensor_parallel_size=2)
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits, strict=False):
        assert ((a - b).norm() / b.norm()).item() < 1e-4
