"""`qwen35 plan` end to end: outputs, the JSON schema, --plot, errors, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen35.cli import main

MODELS = ["Qwen3.5-0.8B", "Qwen3.5-2B", "Qwen3.5-4B", "Qwen3.5-9B", "Qwen3.5-27B",
          "Qwen3.5-35B-A3B", "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B"]  # fmt: skip
WITH_FP8 = {"Qwen3.5-27B", "Qwen3.5-35B-A3B", "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B"}
FIT_KEYS = {"fits", "max_context", "max_concurrency", "decode_tokens_per_s_estimate", "tp", "dp",
            "weights_bytes_per_gpu", "kv_bytes_per_token_per_gpu", "reason"}  # fmt: skip


def run_json(capsys, *argv) -> dict:
    assert main(["plan", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_output(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    for tag, bf16 in (("0.8B", "1.63"), ("27B", "51.75"), ("397B-A17B", "751.39")):
        assert tag in out and bf16 in out
    assert "28.75" in out and "378.23" in out  # FP8 sizes
    for gpu in ("RTX 4090", "RTX 5090", "RTX A6000", "H100", "H200"):
        assert gpu in out
    assert "Best per GPU" in out and "MoE vs dense" in out


def test_json_default_schema(capsys):
    d = run_json(capsys)
    assert d["schema"] == "qwen35.plan/1" and d["gpu"] is None
    assert [m["name"] for m in d["models"]] == MODELS
    for m in d["models"]:
        p = m["params_total"]
        assert p == m["params_text"] + m["params_vision"] + m["params_mtp"]
        assert m["weights_bytes"]["bf16"] == 2 * p
        assert (m["weights_bytes"]["fp8"] is not None) == (m["name"] in WITH_FP8)
        assert m["kv_bytes_per_token"] > 0 and m["state_bytes_per_sequence"] > 0
        assert "fits" not in m
    assert len(d["recommendations_common_gpus"]) == 5


def test_json_with_gpu(capsys):
    d = run_json(capsys, "--gpu", "RTX 4090", "--context", "16K")
    assert d["gpu"]["name"] == "RTX 4090" and d["request"]["context"] == 16384
    for m in d["models"]:
        assert set(m["fits"]) == {"bf16", "fp8"}
        assert FIT_KEYS <= set(m["fits"]["bf16"])
        assert (m["fits"]["fp8"] is None) == (m["name"] not in WITH_FP8)
    by = {m["name"]: m["fits"]["bf16"] for m in d["models"]}
    assert by["Qwen3.5-9B"]["fits"] and by["Qwen3.5-9B"]["decode_tokens_per_s_estimate"] > 0
    assert not by["Qwen3.5-27B"]["fits"] and by["Qwen3.5-27B"]["max_context"] == 0
    assert d["recommendation"]["model"] == "Qwen3.5-9B"


def test_text_only_and_kv_dtype(capsys):
    base = run_json(capsys, "-m", "27B", "--gpu", "RTX 5090", "--dtype", "fp8")
    lean = run_json(capsys, "-m", "27B", "--gpu", "RTX 5090", "--dtype", "fp8", "--text-only",
                    "--kv-dtype", "fp8")  # fmt: skip
    b, t = base["models"][0]["fits"]["fp8"], lean["models"][0]["fits"]["fp8"]
    assert t["weights_bytes_per_gpu"] < b["weights_bytes_per_gpu"]
    assert t["kv_bytes_per_token_per_gpu"] * 2 == b["kv_bytes_per_token_per_gpu"]
    assert t["max_context"] > 2 * b["max_context"]
    assert base["models"][0]["fits"]["bf16"] is None  # only the asked dtype


def test_speculative_tokens(capsys):
    """--num-speculative-tokens 1: caches of the MTP head's layer and spare states, one GPU per
    replica, and launch commands that turn MTP drafts on in each engine."""
    argv = ("-m", "9B", "--gpu", "H200", "-n", "2")
    base = run_json(capsys, *argv)
    spec = run_json(capsys, *argv, "--num-speculative-tokens", "1")
    b, s = base["models"][0]["fits"]["bf16"], spec["models"][0]["fits"]["bf16"]
    assert spec["request"]["num_speculative_tokens"] == 1
    assert s["kv_bytes_per_token_per_gpu"] * 8 == b["kv_bytes_per_token_per_gpu"] * 9  # 8 + 1 layers
    assert s["state_bytes_per_sequence_per_gpu"] == 2 * b["state_bytes_per_sequence_per_gpu"]
    assert s["max_concurrency"] < b["max_concurrency"] and (s["tp"], s["dp"]) == (1, 2)
    launch = spec["recommendation"]["launch"]
    assert "--num-speculative-tokens 1" in launch["qwen35"]
    assert '"method": "mtp"' in launch["vllm"] and "NEXTN" in launch["sglang"]
    assert "speculative" not in json.dumps(base["recommendation"]["launch"])
    assert main(["plan", *argv, "--num-speculative-tokens", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "8 + 1 MTP layers" in out and "MTP drafts" in out and "Counted without drafts" in out
    three = run_json(capsys, *argv, "--num-speculative-tokens", "3")
    t = three["models"][0]["fits"]["bf16"]
    assert t["kv_bytes_per_token_per_gpu"] == s["kv_bytes_per_token_per_gpu"]
    assert t["state_bytes_per_sequence_per_gpu"] == 4 * b["state_bytes_per_sequence_per_gpu"]
    launch = three["recommendation"]["launch"]
    assert "--num-speculative-tokens 3" in launch["qwen35"]
    assert '"num_speculative_tokens": 3' in launch["vllm"]
    assert "--speculative-num-steps 3" in launch["sglang"]
    assert "--speculative-num-draft-tokens 4" in launch["sglang"]


def test_ngram_speculative_method(capsys):
    """--speculative-method ngram: spare states without the MTP layer's KV, allowed --text-only,
    and launch commands for n-gram drafts."""
    argv = ("-m", "9B", "--gpu", "H200", "--num-speculative-tokens", "3")
    mtp = run_json(capsys, *argv)
    ngram = run_json(capsys, *argv, "--speculative-method", "ngram", "--text-only")
    m, g = mtp["models"][0]["fits"]["bf16"], ngram["models"][0]["fits"]["bf16"]
    assert ngram["request"]["speculative_method"] == "ngram"
    assert g["kv_bytes_per_token_per_gpu"] * 9 == m["kv_bytes_per_token_per_gpu"] * 8  # no MTP layer
    assert g["state_bytes_per_sequence_per_gpu"] == m["state_bytes_per_sequence_per_gpu"]
    launch = ngram["recommendation"]["launch"]
    assert "--num-speculative-tokens 3 --speculative-method ngram" in launch["qwen35"]
    assert '"method": "ngram"' in launch["vllm"] and '"prompt_lookup_max": 4' in launch["vllm"]
    assert "NEXTN" not in launch["sglang"]
    assert main(["plan", *argv, "--speculative-method", "ngram"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "n-gram drafts (3 a step)" in out and "MTP layers" not in out


def test_custom_config_and_gpu_memory(capsys, tmp_path):
    raw = dict(model_type="qwen3_5_text", vocab_size=1000, hidden_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
               linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
               intermediate_size=256, max_position_embeddings=8192)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    d = run_json(capsys, "-m", str(tmp_path), "--gpu-memory", "2", "--context", "4096")
    m = d["models"][0]
    assert m["params_vision"] == 0 and m["weights_bytes"]["fp8"] is None
    assert m["fits"]["bf16"]["fits"] and m["fits"]["bf16"]["decode_tokens_per_s_estimate"] is None


def test_model_and_gpu_views(capsys):
    assert main(["plan", "-m", "35B-A3B", "--gpu", "H100", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "Recommendation" in out and "tok/s b=4" in out
    assert main(["plan", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "397B-A17B" in out and "tp4x2" in out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--model", "Qwen3.5-28B"], "did you mean"),
        (["--gpu", "RTX 4080"], "did you mean 'RTX 4090'"),
        (["--num-gpus", "0"], "--num-gpus"),
        (["--tp", "3", "--num-gpus", "8"], "divide"),
        (["--context", "300K"], "exceeds"),
        (["--batch", "0"], "--batch"),
        (["--gpu-memory", "-2"], "positive"),
        (["-m", "35B-A3B-FP8", "--tp", "8"], "64 per rank"),
        (["-m", "/nonexistent/config.json"], "no config file"),
        (["-m", "Qwen3.5-9B-Q4_K_M.gguf"], "no GGUF file at"),
        # the whole family at a size that splits none of it (a ValueError traceback before)
        (["--tp", "3"], "--tp 3 cannot split any Qwen 3.5 model"),
        (["--tp", "3"], "sizes that split all of them: 1, 2, 4, 8"),
        (["--dtype", "int8", "--cpu-bandwidth", "-1"], "--cpu-bandwidth must be a positive"),
        (["--cpu-bandwidth", "50"], "goes with the CPU plans (--dtype int8 / int4"),
        (["-m", "9B", "--gpu", "H100", "--cpu-memory", "8"], "--cpu-memory goes with the CPU plans"),
        (["--num-speculative-tokens", "1", "--text-only"], "--text-only leaves out"),
    ],
)
def test_errors(capsys, argv, msg):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_fp8_without_a_release_is_quantized_at_load(capsys):
    """--dtype fp8 for a model without an FP8 checkpoint (9B): planned in the official block
    layout the engine quantizes the BF16 weights into at load, and launched so (the base
    repository with --quantization fp8 in all three engines); a model with a release (27B)
    keeps its -FP8 repository."""
    from qwen35.catalog import load_model_config
    from qwen35.plan.params import weight_bytes

    d = run_json(capsys, "-m", "9B", "--dtype", "fp8", "--gpu", "RTX 4090", "--text-only")
    fit = d["models"][0]["fits"]["fp8"]
    assert fit["fits"] and d["models"][0]["fits"]["bf16"] is None
    cfg = load_model_config("Qwen3.5-9B")
    assert fit["weights_bytes_per_gpu"] == weight_bytes(cfg, "fp8", text_only=True)
    launch = d["recommendation"]["launch"]
    for engine in ("qwen35", "vllm", "sglang"):
        assert " Qwen/Qwen3.5-9B " in launch[engine] and "--quantization fp8" in launch[engine]
    d = run_json(capsys, "-m", "27B", "--dtype", "fp8", "--gpu", "H100 SXM", "--text-only")
    launch = d["recommendation"]["launch"]
    assert "Qwen/Qwen3.5-27B-FP8 " in launch["vllm"] and "--quantization" not in launch["vllm"]
    main(["plan", "--dtype", "fp8", "--gpu", "RTX 4090"])
    assert "FP8 of Qwen3.5-0.8B, Qwen3.5-2B, Qwen3.5-4B, Qwen3.5-9B (no FP8 checkpoint)" in \
        " ".join(capsys.readouterr().out.split())


def test_a_tp_size_some_models_cannot_take(capsys):
    """--tp 16 over the family: the models it cannot split say why in their cells, the others
    are planned."""
    d = run_json(capsys, "--tp", "16", "--gpu", "H100 SXM")
    fits = {m["name"]: m["fits"] for m in d["models"]}
    assert "cannot be split tp=16" in json.dumps(fits["Qwen3.5-0.8B"])
    assert any(isinstance(f, dict) for f in fits["Qwen3.5-397B-A17B"].values())


@pytest.mark.parametrize("args", [["--context", "lots"], ["--chunk", "inf"], ["--context", "nan"]])
def test_bad_context_syntax(capsys, args):
    with pytest.raises(SystemExit) as e:  # (--chunk inf: an OverflowError traceback before)
        main(["plan", *args])
    assert e.value.code == 2
    assert "not a token count" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--gpu-memory", "inf"], ["--gpu-memory", "80", "--gpu-bandwidth",
                                  "inf"], ["-m", "0.8B", "--dtype", "int4", "--cpu-bandwidth", "inf"]])  # fmt: skip
def test_infinite_gpu_and_cpu_figures_are_refused(capsys, args):
    assert main(["plan", *args]) == 2  # (an 'inf tok/s' column before)
    assert "must be a positive" in capsys.readouterr().err


def test_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mem.png"
    assert main(["plan", "--gpu", "RTX 4090", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main(["plan", "--plot", str(tmp_path / "x.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_plan_imports_no_torch():
    code = (
        "import sys; from qwen35.cli import main; "
        "rc = main(['plan', '--gpu', 'RTX 4090']); rc |= main(['plan', '--json']); "
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


def test_a_model_with_a_short_native_context_is_planned_at_it(tmp_path, capsys):
    """Without --context a model whose native context is under the 32K default is planned at
    its own (it was an error asking for --yarn); an explicit --context past it still is."""
    from tiny import tiny_config_dict

    cfg = {"model_type": "qwen3_5_text", **tiny_config_dict(max_position_embeddings=4096)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "-m", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["request"]["context"] == 4096
    assert "note: planning at 4,096 tokens, the native context of" in out.err
    assert main(["plan", "-m", str(tmp_path), "--context", "8192"]) == 2
    assert "exceeds" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_gpu_plans_of_the_weight_only_formats(capsys, dtype):
    """`--dtype int4 | int8 --gpu`: the engine holds those formats on a GPU too (Triton GEMVs
    reading them), so a GPU plan counts them as the loader stores them (weight_bytes), adds the
    buffer long prefills dequantize a matrix into (27B: its MLP's gate and up, packed) to the working
    memory, and launches ours with --quantization, vLLM / SGLang on the checkpoint `qwen35
    quantize` writes (compressed-tensors, which both read). 27B in int4 fits a 24 GiB GPU; in
    BF16 it does not."""
    from qwen35.catalog import load_model_config
    from qwen35.plan.params import weight_bytes
    from qwen35.plan.sharding import dequant_buffer_bytes

    argv = ("-m", "27B", "--gpu", "RTX 4090", "--text-only", "--context", "8192")
    d = run_json(capsys, *argv, "--dtype", dtype)
    fit = d["models"][0]["fits"][dtype]
    cfg = load_model_config("Qwen3.5-27B")
    assert fit["weights_bytes_per_gpu"] == weight_bytes(cfg, dtype, text_only=True)
    assert fit["fits"] == (dtype == "int4")
    bf16 = run_json(capsys, *argv, "--dtype", "bf16")["models"][0]["fits"]["bf16"]
    assert not bf16["fits"]
    assert dequant_buffer_bytes(cfg) == 2 * 2 * cfg.intermediate_size * cfg.hidden_size
    moe = load_model_config("Qwen3.5-35B-A3B")  # stacked experts: read as codes by the grouped
    # GEMM, nothing dequantized; the largest: a DeltaNet layer's in_proj_qkv + in_proj_z (packed)
    qkvz = 2 * moe.linear_num_key_heads * moe.linear_key_head_dim \
        + 2 * moe.linear_num_value_heads * moe.linear_value_head_dim  # fmt: skip
    assert dequant_buffer_bytes(moe) == 2 * qkvz * moe.hidden_size == 48 * 2**20
    assert fit["working_bytes_per_gpu"] == bf16["working_bytes_per_gpu"] + dequant_buffer_bytes(cfg)
    if dtype == "int4":
        launch = d["recommendation"]["launch"]
        assert "--model Qwen/Qwen3.5-27B " in launch["qwen35"]
        assert launch["qwen35"].endswith("--quantization int4")
        for engine in ("vllm", "sglang"):
            assert launch[engine].startswith(
                "qwen35 quantize Qwen/Qwen3.5-27B ./Qwen3.5-27B-int4 --to int4 && ")
            assert " ./Qwen3.5-27B-int4 " in launch[engine] and "--quantization" not in launch[engine]
