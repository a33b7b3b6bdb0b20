"""Checkpoint loader: layouts, expert forms, shards, dtypes, tying, strict errors, Hub, random."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen35 import weights
from qwen35.benchmarks.hf_baseline import hf_text_config
from qwen35.config import ModelConfig
from qwen35.errors import Qwen35Error
from qwen35.loader import CheckpointError, load_model, parse_dtype
from tiny import hub_snapshot, save_checkpoint, tiny_config_dict


def hf_factory(cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    """transformers' text model for a ModelConfig: the reference for names and shapes.
    Built on the CPU: its rotary buffers are computed at construction (the loader builds
    under torch.device("meta") and replaces every parameter anyway)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    c = hf_text_config(cfg)
    c._attn_implementation = "eager"
    if cfg.is_moe:
        c._experts_implementation = "eager"
    with torch.device(device):
        return (Qwen3_5MoeForCausalLM if cfg.is_moe else Qwen3_5ForCausalLM)(c)


def load(path, **kw):
    kw.setdefault("progress", False)
    return load_model(path, **kw)


def assert_same_state(model, ref, dtype=torch.float32, disk=torch.float32):
    sd, want = model.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        expect = v.to(disk).to(dtype)  # what the file holds, cast to the load dtype
        assert sd[k].dtype == dtype, k
        assert torch.equal(sd[k], expect), k


CASES = [  # moe, layout, experts, shards, dtype on disk
    (False, "text", "fused", 1, torch.float32),
    (False, "vlm", "fused", 3, torch.float32),
    (False, "vlm", "fused", 1, torch.bfloat16),
    (True, "text", "fused", 3, torch.bfloat16),
    (True, "text", "per_expert", 1, torch.float32),
    (True, "vlm", "fused", 1, torch.float32),
    (True, "vlm", "per_expert", 3, torch.float32),
    (True, "vlm", "per_expert", 1, torch.bfloat16),
]


@pytest.mark.parametrize("moe,layout,experts,shards,disk", CASES)
def test_layouts_load_exactly(tmp_path, moe, layout, experts, shards, disk):
    ref = save_checkpoint(
        tmp_path, moe=moe, layout=layout, experts=experts, shards=shards, dtype=disk
    )
    model = load(tmp_path, dtype="fp32")
    assert_same_state(model, ref, torch.float32, disk)
    rep = model.load_report
    assert rep.skipped == ({"model.visual": 21, "mtp": 2} if layout == "vlm" else {})
    assert len(rep.files) == shards and rep.num_tensors > 0 and rep.num_bytes > 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.model_dir == tmp_path


def test_hf_mapping_independent_of_model_class(tmp_path):
    # the name mapping must load transformers' own module too (identical names)
    ref = save_checkpoint(tmp_path, moe=True, layout="vlm", experts="per_expert", shards=3)
    assert_same_state(load(tmp_path, dtype="fp32", model_factory=hf_factory), ref)


def test_bf16_load_casts_fp32_tensors(tmp_path):
    ref = save_checkpoint(tmp_path, moe=True, layout="vlm", experts="fused")
    model = load(tmp_path, dtype="bf16")
    assert_same_state(model, ref, torch.bfloat16, torch.float32)
    n_tensors = model.load_report.num_tensors
    assert model.load_report.cast == {"F32->bfloat16": n_tensors}
    assert model.load_report.dtype == "bfloat16"


@pytest.mark.parametrize("moe", [False, True])
def test_logits_match_transformers(tmp_path, moe):
    ref = save_checkpoint(tmp_path, moe=moe, layout="vlm", experts="per_expert" if moe else "fused")
    model = load_model(tmp_path, dtype="fp32", progress=False)
    assert model.config.hidden_size == 64
    ids = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    got = getattr(got, "logits", got)
    assert got.shape == (2, 75, 256)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("lm_head", ["absent", "equal", "different"])
def test_tied_embeddings(tmp_path, caplog, lm_head):
    ref = save_checkpoint(tmp_path, tie_word_embeddings=True, layout="vlm")
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    assert "lm_head.weight" not in sd
    emb = sd["model.language_model.embed_tokens.weight"]
    if lm_head != "absent":
        sd["lm_head.weight"] = emb.clone() + (1.0 if lm_head == "different" else 0.0)
        save_file(sd, f)
    with caplog.at_level(logging.WARNING, logger="qwen35.loader"):
        model = load(tmp_path, dtype="fp32")
    sd_model = model.state_dict()
    assert torch.equal(sd_model["model.embed_tokens.weight"], emb)
    assert torch.equal(sd_model["lm_head.weight"], emb)  # tied: the embedding wins
    assert_same_state(model, ref)
    assert ("differs from the tied" in caplog.text) == (lm_head == "different")


def test_loader_ties_a_module_that_did_not(tmp_path):
    # the config ties but the module built separate parameters: the loader shares them
    ref = save_checkpoint(tmp_path, tie_word_embeddings=True, layout="vlm")

    def untied(cfg):
        return hf_factory(dataclasses.replace(cfg, tie_word_embeddings=False))

    model = load(tmp_path, dtype="fp32", model_factory=untied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_state(model, ref)


def test_factory_buffers_left_on_meta_are_refused(tmp_path):
    # the loader builds under torch.device("meta"); transformers' rotary inv_freq built there
    # has no values, and loading says so instead of running with garbage
    save_checkpoint(tmp_path, layout="text")

    with pytest.raises(Qwen35Error, match="meta device"):
        load(tmp_path, dtype="fp32", model_factory=lambda cfg: hf_factory(cfg, device="meta"))


def test_untied_config_without_head(tmp_path):
    save_checkpoint(tmp_path, layout="text")
    edit_file(tmp_path / "model.safetensors", lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="should say tie_word_embeddings=true"):
        load(tmp_path)


def test_tied_head_only(tmp_path):
    # a tied checkpoint that stores the shared matrix under lm_head.weight only
    save_checkpoint(tmp_path, tie_word_embeddings=True, layout="text")
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    emb = sd.pop("model.embed_tokens.weight")
    sd["lm_head.weight"] = emb
    save_file(sd, f)
    model = load(tmp_path, dtype="fp32")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], emb)


def test_only_one_file_open_at_a_time(tmp_path, monkeypatch):
    # peak memory: a shard's mmap is closed before the next is opened
    save_checkpoint(tmp_path, moe=True, shards=3)
    real_open, state = weights.open_safetensors, {"open": 0, "max": 0, "calls": 0}

    class Handle:
        def __init__(self, path):
            self.h = real_open(path)

        def __enter__(self):
            state["open"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["open"])
            return self.h.__enter__()

        def __exit__(self, *a):
            state["open"] -= 1
            return self.h.__exit__(*a)

    monkeypatch.setattr(weights, "open_safetensors", Handle)
    load(tmp_path, dtype="fp32")
    assert state["max"] == 1 and state["calls"] == 6  # 3 header scans + 3 data passes


def tiny_config(moe: bool = False) -> dict:
    return {"model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text", **tiny_config_dict(moe)}


# ---- errors -------------------------------------------------------------------------------------
def edit_file(path: Path, fn) -> None:
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_missing_unexpected_and_shape_in_one_error(tmp_path):
    save_checkpoint(tmp_path, layout="vlm")
    pre = "model.language_model."

    def damage(sd):
        del sd[pre + "layers.0.linear_attn.A_log"]
        del sd[pre + "norm.weight"]
        sd[pre + "layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
        sd[pre + "layers.3.self_attn.q_norm.weight"] = torch.zeros(31)

    edit_file(tmp_path / "model.safetensors", damage)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "2 tensor(s) missing from the checkpoint" in msg
    assert "model.layers.0.linear_attn.A_log [4]" in msg and "model.norm.weight [64]" in msg
    assert "1 tensor(s) unexpected" in msg and "layers.0.mlp.extra.weight" in msg
    assert "1 tensor(s) with a wrong shape" in msg
    assert "self_attn.q_norm.weight: checkpoint [31], model expects [32]" in msg


def test_error_lists_at_most_ten(tmp_path):
    save_checkpoint(tmp_path, layout="text")
    edit_file(
        tmp_path / "model.safetensors",
        lambda sd: sd.update({f"extra.{i}.weight": torch.zeros(1) for i in range(25)}),
    )
    with pytest.raises(CheckpointError, match="25 tensor") as e:
        load(tmp_path)
    assert "... and 15 more" in str(e.value)


def test_missing_expert_slices(tmp_path):
    save_checkpoint(tmp_path, moe=True, layout="vlm", experts="per_expert")
    edit_file(
        tmp_path / "model.safetensors",
        lambda sd: sd.pop("model.language_model.layers.2.mlp.experts.5.up_proj.weight"),
    )
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    assert "layers.2.mlp.experts.gate_up_proj: 1 of 16 per-expert slices missing" in str(e.value)
    assert "experts.5.up_proj.weight" in str(e.value)


def test_truncated_file_names_the_file(tmp_path):
    save_checkpoint(tmp_path, shards=3)
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{shard.name}.*truncated"):
        load(tmp_path)


def test_missing_shard_file(tmp_path):
    save_checkpoint(tmp_path, shards=3)
    sorted(tmp_path.glob("*.safetensors"))[2].unlink()
    with pytest.raises(CheckpointError, match="1 are missing.*model-00003-of-00003"):
        load(tmp_path)


def test_more_layers_in_weights_than_config(tmp_path):
    save_checkpoint(tmp_path, layout="vlm", num_hidden_layers=8)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 4
    cfg["text_config"]["layer_types"] = cfg["text_config"]["layer_types"][:4]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    assert "the checkpoint has layers up to 7 (8 layers)" in str(e.value)
    assert "num_hidden_layers=4" in str(e.value)


def test_fewer_layers_in_weights_than_config(tmp_path):
    save_checkpoint(tmp_path, layout="text", num_hidden_layers=4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    cfg["layer_types"] = cfg["layer_types"] * 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has only 4 layers but the config says"):
        load(tmp_path)


def test_hidden_size_mismatch(tmp_path):
    save_checkpoint(tmp_path, layout="text")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert (
        "weights have vocab_size=256, hidden_size=64 but the config says vocab_size=256, hidden_size=128"
        in msg
    )
    assert "embed_tokens.weight: checkpoint [256, 64], model expects [256, 128]" in msg


def test_dense_config_moe_weights(tmp_path):
    save_checkpoint(tmp_path, moe=True, layout="text")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="qwen3_5_text", intermediate_size=96)
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        cfg.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is a MoE model but the config describes a dense"):
        load(tmp_path)


@pytest.mark.parametrize(
    "source,match",
    [
        ("/nonexistent/qwen-dir", "no model directory at '/nonexistent/qwen-dir'"),
        ("not-a-model-name", "no model directory at 'not-a-model-name'"),
    ],
)
def test_nonexistent_path(source, match):
    with pytest.raises(CheckpointError, match=match):
        load(source)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights.*load_format='random'"):
        load(tmp_path)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load("Qwen/Qwen3.5-0.8B")
    msg = str(e.value)
    assert "not in " + str(tmp_path / "hub") in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download Qwen/Qwen3.5-0.8B" in msg


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    # a snapshot in the standard cache layout resolves without any network access
    ref = save_checkpoint(hub_snapshot(tmp_path, monkeypatch, "test-org/tiny-qwen"), layout="vlm")
    model = load("test-org/tiny-qwen", dtype="fp32")
    assert_same_state(model, ref)
    assert model.load_report.source.endswith("0123abcd") and model.model_dir.name == "0123abcd"


def test_errors_are_user_facing():
    # the CLI prints Qwen35Error messages as `error: ...` and exits 2 (no traceback)
    assert issubclass(CheckpointError, Qwen35Error)
    with pytest.raises(Qwen35Error, match="unknown dtype 'int3'"):
        parse_dtype("int3")
    with pytest.raises(Qwen35Error, match="unknown load_format"):
        load("x", load_format="pickle")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16


def test_cli_prints_error_without_traceback(tmp_path, capsys):
    pytest.importorskip("qwen35.commands.generate", reason="`qwen35 generate` not written yet")
    from qwen35.cli import main

    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: no model directory at") and "Traceback" not in err


# ---- random weights -----------------------------------------------------------------------------
def test_random_weights_from_config(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(moe=True)))
    with caplog.at_level(logging.WARNING, logger="qwen35.loader"):
        model = load(tmp_path, load_format="random", dtype="fp32", seed=3)
    assert "random weights:" in caplog.text and "NOT a real checkpoint" in caplog.text
    assert model.load_report.random and model.model_dir == tmp_path
    sd = model.state_dict()
    assert torch.all(sd["model.layers.0.input_layernorm.weight"] == 0)
    assert torch.all(sd["model.layers.0.linear_attn.norm.weight"] == 1)
    a_log = sd["model.layers.1.linear_attn.A_log"]
    assert a_log.min() >= 0 and a_log.max() <= math.log(16)
    w = sd["model.layers.0.mlp.experts.gate_up_proj"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    again = load(tmp_path, load_format="random", dtype="fp32", seed=3).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)  # seeded


def test_random_catalog_name(caplog):
    # "random:NAME" resolves the bundled config; a spy factory keeps the test tiny
    seen = []

    def spy(cfg):
        seen.append(cfg)
        return hf_factory(ModelConfig.from_hf(tiny_config()))

    with caplog.at_level(logging.WARNING, logger="qwen35.loader"):
        model = load_model("random:Qwen3.5-0.8B", dtype="bf16", model_factory=spy)
    assert seen[0].name == "Qwen3.5-0.8B" and seen[0].hidden_size == 1024
    assert "random weights: Qwen3.5-0.8B" in caplog.text
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_random_model_runs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    model = load_model(tmp_path, load_format="random", dtype="fp32")
    out = model(torch.randint(0, 256, (1, 9)))
    assert torch.isfinite(getattr(out, "logits", out)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(tmp_path):
    ref = save_checkpoint(tmp_path, moe=True, layout="vlm", experts="per_expert", shards=3)
    model = load(tmp_path, dtype="bf16", device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k


# the peak is VmHWM, this process's own high-water mark: ru_maxrss would start from the parent's
# RSS at fork (Linux carries it over exec), so a big pytest process failed this test
_RSS_SCRIPT = """
import os, sys
import torch
from qwen35.loader import load_model
import qwen35.models.qwen3_5

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak_rss():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

base = rss()
m = load_model(sys.argv[1], dtype="fp32", progress=False)
print(base, peak_rss(), sum(p.numel() * p.element_size() for p in m.parameters()))
"""


@pytest.mark.slow
def test_peak_rss_is_model_plus_one_shard(tmp_path):
    # python -m pytest -q -m slow tests/test_loader.py -k peak_rss -s
    import subprocess
    import sys

    from safetensors.torch import save_file

    raw = {
        **tiny_config(),
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "linear_num_key_heads": 4,
        "linear_num_value_heads": 8,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "num_attention_heads": 8,
        "head_dim": 64,
    }
    src = load_model(ModelConfig.from_hf(raw), load_format="random", dtype="bf16")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    names, shards = sorted(sd), 4
    per, weight_map = -(-len(names) // shards), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, str(tmp_path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    del src, sd
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    base, peak, model_bytes = map(int, out.stdout.split())
    shard = max(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    print(f"peak - baseline {(peak - base) / 2**20:.0f} MiB; model {model_bytes / 2**20:.0f} MiB")
    assert peak - base <= model_bytes + shard


def test_engine_with_random_weights_and_no_seed(tmp_path):
    """`LLMEngine(path, load_format="random")` without a seed loads (seed 0), reproducibly."""
    from qwen35.engine.llm_engine import LLMEngine

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    a = LLMEngine(str(tmp_path), load_format="random", dtype="fp32", verbose=False)
    b = LLMEngine(str(tmp_path), load_format="random", dtype="fp32", seed=0, verbose=False)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_engine_advises_against_bf16_on_a_cpu_without_native_bf16(tmp_path, monkeypatch, caplog):
    """An explicit --dtype bf16 where bf16 GEMMs are emulated (AVX2-only CPUs) is logged with what
    to use instead; `auto` there computes in fp32 and says nothing."""
    from qwen35 import devices
    from qwen35.engine.llm_engine import LLMEngine

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    for dtype, said in (("bf16", True), ("fp32", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qwen35"):
            LLMEngine(str(tmp_path), load_format="random", dtype=dtype, max_model_len=64).shutdown()
        assert ("--dtype auto" in caplog.text) == said, caplog.text


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_warns_before_loading_more_than_the_machine_has(tmp_path, monkeypatch, caplog, quantization):
    """On a CPU, a load that needs more memory than /proc/meminfo's MemAvailable is warned about
    before any weight is read (the OS would kill it minutes in, silently), with the int4 option's
    need; none when it fits."""
    import qwen35.loader as loader
    from qwen35.plan.cpu import load_peak_bytes

    save_checkpoint(tmp_path, dtype=torch.bfloat16, intermediate_size=128)
    monkeypatch.setattr(loader, "available_memory", lambda: 1000)
    with caplog.at_level(logging.WARNING, logger="qwen35.loader"):
        m = loader.load_model(tmp_path, dtype="bf16", quantization=quantization)
    (msg,) = [r.getMessage() for r in caplog.records if "is available" in r.getMessage()]
    assert "the system may kill the process" in msg and "0.0 GiB is available" in msg
    assert ("--quantization int4 needs about" in msg) == (quantization is None)
    if quantization:
        assert f"{load_peak_bytes(m.config, 'int4') / 2**30:.1f} GiB of memory" in msg
    caplog.clear()
    monkeypatch.setattr(loader, "available_memory", lambda: 1 << 40)
    with caplog.at_level(logging.WARNING, logger="qwen35.loader"):
        loader.load_model(tmp_path, dtype="bf16", quantization=quantization)
    assert not [r for r in caplog.records if "is available" in r.getMessage()]


def test_large_random_tensors_are_drawn_in_chunks_independent_of_threads(monkeypatch):
    """init_random_ draws a large CPU matrix chunk by chunk on torch's threads, each chunk from
    its own seeded generator: the same values at 1 and 2 threads and at every call with the seed,
    other values with another seed, N(0, 0.02), and no two chunks alike."""
    import qwen35.loader as loader_mod

    monkeypatch.setattr(loader_mod, "RANDOM_CHUNK", 1000)
    threads = torch.get_num_threads()

    def draw(seed, n_threads):
        torch.set_num_threads(n_threads)
        p = torch.empty(11, 500, dtype=torch.bfloat16)  # 5.5 chunks
        loader_mod.init_random_({"model.layers.0.mlp.up_proj.weight": p}, seed=seed)
        return p

    try:
        a, b, c = draw(3, 1), draw(3, 2), draw(4, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = a.float().view(-1)
    assert abs(flat.std().item() - 0.02) < 0.002 and abs(flat.mean().item()) < 0.002
    chunks = flat[:5000].view(5, 1000)
    assert all(not torch.equal(chunks[i], chunks[j]) for i in range(5) for j in range(i + 1, 5))
    # under inference mode (the vision bench attaches a random tower inside it): the pool's
    # threads write the inference tensor too (inference mode is per thread; they raised before)
    with torch.inference_mode():
        torch.set_num_threads(2)
        try:
            p = torch.empty(11, 500, dtype=torch.bfloat16)
            loader_mod.init_random_({"model.layers.0.mlp.up_proj.weight": p}, seed=3)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(p, a)
