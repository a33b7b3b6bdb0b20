"""The side benchmarks under bench/ still run (tiny sizes; no timing is checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kernel_modules import native_or_skip
from qwen35.kernels import attention, gemv

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_bench_runs(capsys):
    native_or_skip(attention.ATTENTION, "the CPU attention kernel")
    _load("attention_cpu").main(
        ["--contexts", "17,40", "--dtypes", "bf16,fp32,fp32:bf16", "--rounds", "1", "--reps", "1"]
    )
    out = capsys.readouterr().out
    assert out.count("L=") == 6 and "gather+SDPA" in out and "fp32:bf16" in out
    _load("attention_cpu").main(["--contexts", "40", "--dtypes", "fp32:fp16", "--rounds", "2",
                                 "--reps", "1", "--cold"])  # fmt: skip
    out = capsys.readouterr().out
    assert "K/V cold" in out and out.count("L=") == 1


def test_prefill_bench_runs_through_the_engine(capsys, tmp_path):
    """bench/gpu_prefill.py --engine (on a CPU: the PyTorch chunk path only) and the plain
    forward mode, tiny model, prompts over several chunks."""
    import json

    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    cfg = str(tmp_path / "m" / "config.json")
    _load("gpu_prefill").main(["--model", cfg, "--device", "cpu", "--engine", "--tokens", "40",
                               "70", "--reps", "1", "--max-num-batched-tokens", "32", "--out",
                               str(tmp_path / "e.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert "start-up chose 'reference'" in out and out.count("reference ") == 2
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["engine"] and [r["tokens"] for r in doc["rows"]] == [40, 70]
    assert all(r["reference_tok_s"] > 0 for r in doc["rows"])
    _load("gpu_prefill").main(["--model", cfg, "--device", "cpu", "--tokens", "40", "--reps", "1"])
    assert "speedup" in capsys.readouterr().out
    for iv in ("0", "32"):  # the chosen path again, state checkpoints further apart (0: none)
        _load("gpu_prefill").main(["--model", cfg, "--device", "cpu", "--engine", "--tokens", "70",
                                   "--reps", "1", "--max-num-batched-tokens", "32",
                                   "--checkpoint-interval", iv])  # fmt: skip
        out = capsys.readouterr().out
        assert f"reference-ckpt{iv} " in out and "checkpoints every 256 tokens" in out, out


def test_dtype_batches_bench_runs(capsys, tmp_path):
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("dtype_batches").main(["--model", str(tmp_path / "m" / "config.json"), "--batches", "1",
                                 "3", "--rounds", "1", "--threads", "1", "--new-tokens", "5"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("batch") == 2 and "fp32+bf16" in out and "x)" in out


def test_kv_dtype_bench_runs(capsys, tmp_path):
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("kv_dtype").main(["--model", str(tmp_path / "m" / "config.json"), "--contexts", "40",
                            "--rounds", "2", "--threads", "1", "--new-tokens", "4",
                            "--quantization", "int8"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("context") == 1 and "bf16" in out and "x)" in out and "/8 tokens" in out


def test_run_batch_bench_runs(capsys, tmp_path):
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("run_batch").main(["--model", str(tmp_path / "m" / "config.json"), "--requests", "3",
                             "--tokens", "3", "--rounds", "2", "--threads", "1",
                             "--dtype", "fp32"])  # fmt: skip
    out = capsys.readouterr().out
    assert "window 1" in out and "batched" in out and "[3, 3] of 3" in out  # fp32: batched == alone


def test_prefix_store_bench_runs(capsys, tmp_path):
    from qwen35.engine import prefix_store
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m", max_position_embeddings=4096)
    real = prefix_store.import_prefix
    _load("prefix_store").main(["--model", str(tmp_path / "m" / "config.json"), "--prefix", "300",
                                "600", "--question", "8", "--rounds", "2", "--dtype", "fp32",
                                "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "per round" in out and "disk hits 4," in out and "errors 0 / 0" in out
    assert prefix_store.import_prefix is real  # (the bench's timing wrapper is gone)


def test_moe_decode_bench_runs(capsys):
    """bench/moe_decode.py against both baselines on a one-layer model of 35B-A3B's shapes; the
    class attributes it switches (SparseMoE.cpu_step / cpu_routed) are restored after."""
    from kernel_modules import cpu_kernels_or_skip
    from qwen35.layers.moe import SparseMoE

    cpu_kernels_or_skip()
    fused = SparseMoE.cpu_step, SparseMoE.cpu_routed
    bench = _load("moe_decode")
    for baseline, label in (("ops", "op-by-op few-token path"), ("loop", "per-expert loop")):
        bench.main(["--layers", "1", "--experts", "8", "--rounds", "1", "--tokens", "1", "2",
                    "--formats", "bf16", "int8", "--baseline", baseline])  # fmt: skip
        out = capsys.readouterr().out
        assert out.count(label) == 4 and out.count("x\n") == 4, out
        assert (SparseMoE.cpu_step, SparseMoE.cpu_routed) == fused
    bench.main(["--layers", "1", "--experts", "8", "--rounds", "1", "--formats", "bf16",
                "--baseline", "ops", "--dtype", "fp32"])  # bf16-stored, fp32 compute  # fmt: skip
    assert capsys.readouterr().out.count("op-by-op few-token path") == 1


def test_decode_formats_bench_runs(capsys, tmp_path):
    """bench/decode_formats.py: formats alternating step by step, a line a round and the
    medians with each format's ratio to the first."""
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("decode_formats").main(["--model", str(tmp_path / "m" / "config.json"), "--formats",
                                  "int8,fp8,bf16", "--rounds", "2", "--steps", "3", "--prompt",
                                  "8", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("round ") == 2 and out.count("fp8/int8") == 3 and "median:" in out, out


def test_int4_x8_bench_runs(capsys, tmp_path):
    from qwen35.quant.layers import Int4Linear
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("int4_x8").main(["--model", str(tmp_path / "m" / "config.json"), "--batches", "1", "2",
                           "--steps", "3", "--threads", "1", "--prefill", "40",
                           "--rounds", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("batch") == 2 and "16-bit / x8" in out and "prefill of 40" in out
    assert Int4Linear.x8 is True  # restored


@pytest.mark.slow  # builds a second gemv_cpu.cpp (~40 s on 2 cores)
def test_gemv_many_bench_runs_against_a_revision(capsys):
    """bench/gemv_many.py: the many-product GEMVs of this checkout and of a git revision (here
    HEAD's sources, built beside), outputs checked equal, a line per format and shape."""
    native_or_skip(gemv.GEMV, "the gemv kernel")
    _load("gemv_many").main(["--baseline", "HEAD", "--shapes", "64x128", "40x200", "--experts",
                             "3", "--rounds", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("ours / base") == 4 and "int8 3 x [40 x 200]" in out, out


def test_gemv_many_bench_fp8_runs(capsys):
    """bench/gemv_many.py --formats fp8: one fp8_linear_many call against one fp8_linear call a
    product (outputs checked equal), no revision needed."""
    from qwen35.kernels import fp8

    native_or_skip(fp8.FP8, "the FP8 kernel")
    _load("gemv_many").main(["--formats", "fp8", "--shapes", "64x200", "--experts", "3",
                             "--rounds", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("ours / base") == 1 and "one call a product" in out, out


def test_int4_prefill_bench_runs(capsys):
    """bench/int4_prefill.py: the int4 kernel at many rows against the dequantise + GEMM path
    (outputs checked within 1e-5), a line per shape and row count."""
    native_or_skip(gemv.INT4, "the int4 kernel")
    _load("int4_prefill").main(["--shapes", "128x256", "--rows", "3", "40", "--rounds", "1",
                                "--reps", "1", "--threads", "1", "--avx2-only"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("kernel / gemm") == 2 and "[128 x 256] 40 rows" in out, out


def test_int4_prefill_bench_engine_runs(capsys, tmp_path):
    """bench/int4_prefill.py --engine: whole int4 prefills, the kernel rule and the GEMM
    alternating; the rule is restored afterwards."""
    from qwen35.quant import matmul
    from tiny import save_checkpoint

    native_or_skip(gemv.INT4, "the int4 kernel")
    rule = matmul.int4_prefill_in_kernel
    save_checkpoint(tmp_path, dtype=torch.bfloat16, moe=False, intermediate_size=128)
    _load("int4_prefill").main(["--engine", str(tmp_path / "config.json"), "--tokens", "40",
                                "--rounds", "2", "--threads", "1"])  # fmt: skip
    assert "gemm / kernel time" in capsys.readouterr().out
    assert matmul.int4_prefill_in_kernel is rule


def test_int6_head_bench_runs(capsys):
    """bench/int6_head.py: the int6 head against the int8 one, a line per shape and row count."""
    native_or_skip(gemv.INT6, "the int6 kernel")
    _load("int6_head").main(["--shapes", "640x128", "--rows", "1,2", "--rounds", "2",
                             "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("int8 / int6 time") == 2 and "640 x 128, 2 row(s)" in out, out


def test_int6_head_bench_against_a_revision_runs(capsys):
    """bench/int6_head.py --baseline REV: the kernel as of a commit beside this one (HEAD's own
    sources here: the same bits)."""
    native_or_skip(gemv.INT6, "the int6 kernel")
    _load("int6_head").main(["--baseline", "HEAD", "--shapes", "640x128", "--rows", "1,9",
                             "--rounds", "2", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("HEAD / this") == 2 and "9 row(s)" in out, out


def test_int6_head_bench_engine_runs(capsys, tmp_path):
    """bench/int6_head.py --engine: whole decode steps of an int4 model, its two heads swapped."""
    from tiny import save_checkpoint

    native_or_skip(gemv.INT6, "the int6 kernel")
    save_checkpoint(tmp_path, dtype=torch.bfloat16, moe=False, intermediate_size=128)
    _load("int6_head").main(["--engine", str(tmp_path / "config.json"), "--rounds", "2",
                             "--threads", "1"])  # fmt: skip
    assert "int8 / int6" in capsys.readouterr().out


def test_small_ops_bench_runs(capsys):
    """bench/small_ops.py: each fused op against its reference (outputs checked first), a line
    per op and row count (the conv at prefill rows only)."""
    from qwen35.kernels import small_ops

    native_or_skip(small_ops.SMALL_OPS, "the small-op kernels")
    _load("small_ops").main(["--rows", "1", "8", "--rounds", "1", "--reps", "1", "--threads",
                             "1", "--dtype", "bf16"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("x\n") == 7 and "causal_conv1d at 8 rows" in out, out


def test_load_memory_bench_runs(capsys, tmp_path):
    """bench/load_memory.py on a tiny checkpoint: the peak and loaded memory it samples, and the
    plan's figures beside them (the tiny model's bytes are below the sampling's resolution)."""
    import sys

    import torch

    from tiny import save_checkpoint

    if not sys.platform.startswith("linux"):
        pytest.skip("RssAnon is Linux's")
    save_checkpoint(tmp_path, dtype=torch.bfloat16, intermediate_size=128)
    out = _load("load_memory").main([str(tmp_path), "--quantization", "int4"])
    assert out["peak_bytes"] >= out["loaded_bytes"] > 0
    assert abs(out["weights_bytes"] - out["plan_weights_bytes"]) / out["plan_weights_bytes"] < 0.01
    assert out["plan_load_peak_bytes"] > out["plan_weights_bytes"]
    assert "while reading" in capsys.readouterr().out


def test_nonfinite_check_bench_runs(capsys, tmp_path):
    """bench/nonfinite_check.py on a tiny checkpoint: the count's rate beside torch's, loads
    with the check and without it."""
    from tiny import save_checkpoint

    save_checkpoint(tmp_path, dtype=torch.bfloat16, vocab_size=512)
    out = _load("nonfinite_check").main([str(tmp_path), "--rounds", "2", "--count-numel", "4096"])
    assert [len(v) for v in out["load_seconds"].values()] == [2, 2]
    text = capsys.readouterr().out
    assert "count_nonfinite" in text and "torch isfinite" in text and "load unchecked" in text


def test_decode_stalls_bench_runs(capsys, tmp_path):
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("decode_stalls").main(["--model", str(tmp_path / "m" / "config.json"), "--dtype",
                                 "fp32", "--streams", "2", "--prompt", "300", "--rounds", "2",
                                 "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "whole chunks" in out and "paced (1000 ms)" in out
    assert "equal in every round and engine" in out
    _load("decode_stalls").main(["--model", str(tmp_path / "m" / "config.json"), "--dtype",
                                 "fp32", "--streams", "1", "--prompt", "300", "--queued", "200",
                                 "--rounds", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "200-token one queued" in out and "queued TTFT s" in out
    _load("decode_stalls").main(["--model", str(tmp_path / "m" / "config.json"), "--dtype",
                                 "fp32", "--offline", "3", "--rounds", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "max_decode_step_ms 0:" in out and "max_decode_step_ms 1000:" in out


def test_gil_wait_bench_runs(capsys, tmp_path):
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    _load("gil_wait").main(["--model", str(tmp_path / "m" / "config.json"), "--dtype", "fp32",
                            "--prompt", "200", "--threads", "1"])  # fmt: skip
    assert "wake-up lateness median" in capsys.readouterr().out


def test_thinking_budget_bench_runs(capsys, tmp_path):
    from tiny import VOCAB_REAL, save_checkpoint

    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32, layout="vlm")
    _load("thinking_budget").main(["--model", str(tmp_path / "m"), "--dtype", "fp32",
                                   "--tokens", "6", "--rounds", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "budget halfway" in out and out.count("tok/s") == 3


def test_head_screen_build_bench_runs(capsys):
    from qwen35.kernels import small_ops

    if small_ops.load() is None:
        pytest.skip("small_ops_cpu.cpp did not build (no compiler / AVX2)")
    _load("head_screen").main(["--build", "--rounds", "1", "--formats", "bf16", "--vocab", "300"])
    out = capsys.readouterr().out
    assert out.count("bf16 head 300 x") == 3 and "finite check" in out


def test_onednn_cache_bench_runs(capsys, tmp_path):
    from tiny import VOCAB_REAL, save_checkpoint

    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    runs = _load("onednn_cache").main([str(tmp_path / "m"), "--capacities", "1024,8",
                                       "--prompts", "3", "--rounds", "1"])  # fmt: skip
    assert set(runs) == {1024, 8} and all(r[0]["tokens"] > 0 for r in runs.values())
    assert "capacity 8: median" in capsys.readouterr().out


def test_prefix_checkpoints_bench_runs(capsys):
    runs = _load("prefix_checkpoints").main(["--slots", "2", "5"])
    assert len(runs["new"]) == 14 and all(n > 0 for n in runs["new"])
    out = capsys.readouterr().out
    assert "prompt tokens computed" in out and out.count("\n") == 4


def test_engine_start_bench_runs(capsys, tmp_path):
    from tiny import VOCAB_REAL, save_checkpoint

    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    runs = _load("engine_start").main([str(tmp_path / "m"), "--rounds", "1", "--prompt", "40"])
    (row,) = runs["new"]
    assert len(row) == 4 and row[0] > 0 and row[1] > 0 and row[3] >= row[1] * 0.5
    assert "new medians: LLM() s" in capsys.readouterr().out
