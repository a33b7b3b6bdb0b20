"""`qwen35 bench` on a tiny random config with --quick sizes: every workload runs, the JSON
document has its schema, the numbers are consistent with the workload definitions. No timings
are asserted (shared machines); only counts, shapes and relations that cannot depend on speed."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from qwen35.benchmarks import SCHEMA, WORKLOADS
from qwen35.benchmarks.common import BenchOptions, load_bench_model
from qwen35.benchmarks.peers import PAIRS, _decode_order, _Ours, interleaved_steps
from qwen35.cli import main
from qwen35.devices import default_dtype, default_quantization, weights_label
from qwen35.errors import Qwen35Error
from tiny import tiny_config_dict


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> str:
    d = tiny_config_dict(model_type="qwen3_5_text", vocab_size=512)
    d["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    path = tmp_path_factory.mktemp("bench") / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.fixture(scope="module")
def doc(tiny_cfg) -> dict:
    from qwen35.benchmarks.runner import run_bench

    opts = BenchOptions(model=tiny_cfg, quick=True, threads=None, contexts=(32, 96), batches=(1, 3))
    # structured, vision, tp, spec and serve have tests of their own
    skip = ("structured", "vision", "tp", "spec", "serve")
    return run_bench(opts, [w for w in WORKLOADS if w not in skip])


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_document_schema(doc):
    assert doc["schema"] == SCHEMA
    assert doc["random_weights"] is True and doc["quick"] is True
    assert set(doc["workloads"]) == {
        "decode",
        "throughput",
        "long_context",
        "multi_turn",
        "dtype",
        "quality",
        "peers",
    }
    auto = {"fp32": "float32", "bf16": "bfloat16"}[default_dtype("cpu")]
    assert doc["dtype"] == auto  # --dtype auto: the engine's CPU default for this machine
    # ... on the weights it keeps (CPUs computing in fp32 keep a BF16 release's bf16 weights)
    storage = default_quantization("auto", "cpu", None, "bfloat16")
    assert doc["weights"] == weights_label(auto, storage)
    if doc["weights"] == "float32+bf16":  # bf16 matrices, fp32 norms and DeltaNet scalars
        assert 2 * doc["num_params"] < doc["weight_bytes"] < 2.1 * doc["num_params"]
    else:
        assert doc["weight_bytes"] == doc["num_params"] * (4 if auto == "float32" else 2)
    json.dumps(doc)  # serialisable as is
    names = [g["name"] for g in doc["goals"]]
    assert len(names) == 3 + len(doc["workloads"]["peers"]["goals"]) and all(
        set(g) == {"name", "target", "measured", "met"} for g in doc["goals"]
    )


def test_quality_and_peers_workloads(doc):
    q = doc["workloads"]["quality"]
    assert set(q["formats"]) == {"fp8", "int8", "int4", "int4-x16", "kv-fp8"}
    assert q["formats"]["kv-fp8"]["weight_bytes"] == q["bf16_weight_bytes"]
    for r in q["formats"].values():
        assert 0 <= r["top1_agreement"] <= 1 and r["mean_kl"] >= -1e-6
        assert 0 <= r["decode_top1_agreement"] <= 1 and r["decode_mean_kl"] >= -1e-6
    i4, x16 = q["formats"]["int4"], q["formats"]["int4-x16"]
    assert i4["weight_bytes"] == x16["weight_bytes"]
    p = doc["workloads"]["peers"]
    ours = {n for n in p["engines"] if n.startswith("qwen35 ")}
    assert ours == {f"qwen35 {f}" for f in ("fp32", "bf16", "int8", "int4", "fp8")}
    for name, r in p["engines"].items():
        assert _finite_positive(r["decode_tokens_per_s"])
        # K/V: bf16 under fp32 compute over weights stored below fp32 (--kv-cache-dtype auto)
        low = name.startswith("qwen35 ") and "+" in r["weights"]
        want = "bfloat16" if low else r["weights"].split("+")[0]  # (the compute dtype)
        assert r["kv_cache"] == ("float16" if name.startswith("llama.cpp") else want)
        assert _finite_positive(r["decode_tokens_per_s_at_context"][str(p["long_context"])])
        for key in ("decode_tokens_per_s_per_round", "decode_tokens_per_s_at_context_per_round"):
            assert len(r[key]) == p["rounds"] and all(_finite_positive(x) for x in r[key])
    # quantized formats hold fewer weight bytes than bf16
    b = p["engines"]["qwen35 bf16"]["weight_bytes"]
    assert all(p["engines"][f"qwen35 {f}"]["weight_bytes"] < b for f in ("int8", "int4", "fp8"))
    ran = p["llama_cpp"] == "ran"
    assert set(p["decode_ratio_per_round"]) == (set(PAIRS) if ran else set())
    assert set(p["decode_at_context_ratio"]) == set(p["decode_ratio_per_round"])
    assert set(p["decode_at_context_ratio_per_round"]) == set(p["decode_ratio_per_round"])
    for fmt, each in p["decode_ratio_per_round"].items():
        a, b = p["engines"][f"qwen35 {fmt}"], p["engines"][f"llama.cpp {PAIRS[fmt]}"]
        for key, got in (("decode_tokens_per_s_per_round", each), (
                "decode_tokens_per_s_at_context_per_round",
                p["decode_at_context_ratio_per_round"][fmt])):  # fmt: skip
            assert got == pytest.approx([x / y for x, y in zip(a[key], b[key], strict=True)])
    if p["llama_cpp"] != "ran":
        assert isinstance(p["llama_cpp"], str) and p["llama_cpp"]  # the reason it was skipped
    # --batches 1,3: each engine's batched decode, a figure a round per batch size
    assert p["batches"] == [1, 3] and p["batch_steps"] > 0
    for r in p["engines"].values():
        assert set(r["batched_decode_tokens_per_s"]) == {"1", "3"}
        for b, each in r["batched_decode_tokens_per_s_per_round"].items():
            assert len(each) == p["rounds"] and all(_finite_positive(x) for x in each)
            assert r["batched_decode_tokens_per_s"][b] == pytest.approx(sorted(each)[len(each) // 2])
    assert set(p["batched_decode_ratio_per_round"]) == set(p["decode_ratio_per_round"])


def test_cpu_description_names_family_and_model():
    from qwen35.benchmarks.common import cpu_description

    info = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\n\n"
    info += "processor\t: 1\nmodel name\t: other\ncpu family\t: 25\nmodel\t\t: 1\n"
    assert cpu_description(info) == "AMD EPYC (family 26, model 2)"
    assert cpu_description("model name\t: Some CPU\n") == "Some CPU"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_peers_formats_compute_as_dtype_auto(native_bf16, monkeypatch):
    """Each format runs as `--dtype auto` would here: on a CPU without native bf16 (Zen 3) the
    bf16 / int8 / int4 / fp8 weights are read by fp32 compute (bf16 compute there is torch's
    single-threaded fallback GEMM: a 2,048-token prefill took minutes); fp32 is fp32 everywhere;
    an explicit --dtype is kept."""
    from qwen35 import devices
    from qwen35.benchmarks.common import BenchOptions
    from qwen35.benchmarks.peers import format_options

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    auto = BenchOptions(dtype="auto", device="cpu")
    c = "bf16" if native_bf16 else "fp32"
    assert format_options("fp32", auto) == ("fp32", None)
    assert format_options("bf16", auto) == (c, None if native_bf16 else "bf16")
    for fmt in ("int8", "int4", "fp8"):
        assert format_options(fmt, auto) == (c, fmt)
    explicit = BenchOptions(dtype="bf16", device="cpu")
    assert format_options("bf16", explicit) == ("bf16", None)
    assert format_options("int8", explicit) == ("bf16", "int8")


def test_peers_decode_order_pairs_twins():
    """Each of our formats decodes next to its llama.cpp twin, the pair's order alternating."""
    names = ["qwen35 fp32", "qwen35 bf16", "qwen35 fp8", "llama.cpp f32", "llama.cpp bf16"]
    engines = dict.fromkeys(names)
    even = ["qwen35 fp32", "llama.cpp f32", "qwen35 bf16", "llama.cpp bf16", "qwen35 fp8"]
    odd = ["llama.cpp f32", "qwen35 fp32", "llama.cpp bf16", "qwen35 bf16", "qwen35 fp8"]
    assert _decode_order(engines, 0) == even and _decode_order(engines, 2) == even
    assert _decode_order(engines, 1) == odd
    assert _decode_order(dict.fromkeys(names[:3]), 1) == names[:3]  # llama.cpp not loaded


def test_peers_pair_steps_alternate():
    """A pair's decode steps alternate one by one, the first to step swapping each time; a run
    that ends early drops out and the other finishes."""
    log = []

    def run(name, n):
        for i in range(n):
            log.append(name)
            yield float(i)

    times = interleaved_steps([run("a", 4), run("b", 4)])
    assert times == [[0.0, 1.0, 2.0, 3.0]] * 2
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a"]
    log.clear()
    assert interleaved_steps([run("a", 1), run("b", 3)]) == [[0.0], [0.0, 1.0, 2.0]]
    assert log == ["a", "b", "b", "b"]


def test_ours_steps_are_timed_requests_steps(tiny_cfg):
    """_Ours.steps yields a request's decode steps (prefill untimed) as timed_request counts
    them, and leaves the engine idle."""
    bm = load_bench_model(BenchOptions(model=tiny_cfg, quick=True, threads=1))
    ours = _Ours(bm, 64)
    for prompt in ([3, 4, 5], list(range(2, 40))):
        steps = list(ours.steps(prompt, 5, f"s{len(prompt)}"))
        assert len(steps) == 4 and all(t > 0 for t in steps)
        assert not ours.engine.has_unfinished_requests()
        assert len(ours.run(prompt, 5, f"r{len(prompt)}")[1]) == 4


def test_decode_workload(doc, tiny_cfg):
    d = doc["workloads"]["decode"]
    assert d["ours"]["num_steps_timed"] == d["rounds"] * (d["new_tokens"] - 1)
    assert d["transformers"]["num_steps_timed"] == d["rounds"] * (d["new_tokens"] - 1)
    for x in (
        d["ours"]["tokens_per_s"],
        d["transformers"]["tokens_per_s"],
        d["roofline_tokens_per_s"],
    ):
        assert _finite_positive(x)
    assert d["speedup_vs_transformers"] == pytest.approx(
        d["ours"]["tokens_per_s"] / d["transformers"]["tokens_per_s"]
    )
    b = d["bytes_per_step"]
    assert b["total"] == b["weights"] + b["kv"] + b["state"]
    # an untied input embedding is read one row per token, not as a table (plan/decode_bytes.py)
    raw = json.loads(open(tiny_cfg).read())
    width = doc["weight_bytes"] // doc["num_params"]
    assert raw["tie_word_embeddings"] is False
    table, row = raw["vocab_size"] * raw["hidden_size"] * width, raw["hidden_size"] * width
    assert b["weights"] == doc["weight_bytes"] - table + row
    assert d["roofline_tokens_per_s"] == pytest.approx(d["read_bandwidth_gbps"] * 1e9 / b["total"])
    # --batches: B sequences decoding together in an engine of their own
    assert [r["batch"] for r in d["batched"]] == [1, 3]
    for r in d["batched"]:
        assert r["num_steps_timed"] == d["rounds"] * d["new_tokens"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"])


def test_throughput_workload(doc):
    t = doc["workloads"]["throughput"]
    assert t["requests"] == 8
    assert t["ours"]["generated_tokens"] == t["output_tokens"]  # every request ran to its length
    assert t["transformers"]["batches"] == math.ceil(8 / t["transformers"]["batch_size"])
    # static batches compute padding and overshoot on top of the requested tokens
    assert (
        t["transformers"]["computed_tokens_incl_padding"] >= t["prompt_tokens"] + t["output_tokens"]
    )
    total = t["prompt_tokens"] + t["output_tokens"]
    assert t["ours"]["total_tokens_per_s"] == pytest.approx(total / t["ours"]["wall_s"])


def test_long_context_workload(doc):
    lc = doc["workloads"]["long_context"]
    assert [r["context_len"] for r in lc["rows"]] == [32, 96]
    for r in lc["rows"]:
        assert _finite_positive(r["hybrid_ms"]) and _finite_positive(r["full_attention_ms"])
        assert _finite_positive(r["hybrid_fp8_kv_ms"])
    # 4 layers: 1 full-attention layer in the hybrid, 4 in the override
    assert lc["kv_bytes_per_token"]["full"] == 4 * lc["kv_bytes_per_token"]["hybrid"]
    itemsize = getattr(torch, doc["dtype"]).itemsize  # the model's K/V against fp8's 1 byte
    assert lc["kv_bytes_per_token"]["hybrid"] == itemsize * lc["kv_bytes_per_token"]["hybrid_fp8"]
    assert lc["state_bytes_per_sequence"]["full"] == 0


def test_multi_turn_workload(doc):
    m = doc["workloads"]["multi_turn"]
    on, off = m["caching_on"], m["caching_off"]
    assert on["prompt_tokens"] == off["prompt_tokens"]  # same lengths in both engines
    assert off["computed_prompt_tokens"] == off["prompt_tokens"]  # nothing cached
    assert on["computed_prompt_tokens"] < off["computed_prompt_tokens"]
    assert on["prefix_cache_hit_tokens"] == on["prompt_tokens"] - on["computed_prompt_tokens"]
    assert len(on["turns"]) == m["turns"] and m["computed_tokens_ratio"] > 1


def test_dtype_workload(doc):
    d = doc["workloads"]["dtype"]
    f32, b16 = d["dtypes"]["float32"], d["dtypes"]["bfloat16"]
    assert f32["weight_bytes"] == 2 * b16["weight_bytes"]
    assert d["dtypes"][doc["weights"]]["weight_bytes"] == doc["weight_bytes"]
    for r in (f32, b16):
        assert _finite_positive(r["prefill_tokens_per_s"]) and _finite_positive(
            r["decode_ms_per_token"]
        )
    assert d["bf16_over_fp32"]["decode"] == pytest.approx(
        b16["decode_tokens_per_s"] / f32["decode_tokens_per_s"]
    )
    i8 = d["dtypes"]["float32+int8"]  # fp32 compute, int8 weights: under bf16's bytes
    assert i8["weight_bytes"] < b16["weight_bytes"] and _finite_positive(i8["decode_ms_per_token"])
    assert d["int8_over_fp32"]["prefill"] == pytest.approx(
        i8["prefill_tokens_per_s"] / f32["prefill_tokens_per_s"]
    )
    b16w = d["dtypes"]["float32+bf16"]  # fp32 compute on bf16-stored matrices (fp32 norms)
    assert b16["weight_bytes"] < b16w["weight_bytes"] < 0.55 * f32["weight_bytes"]
    assert _finite_positive(b16w["decode_ms_per_token"])
    assert d["bf16_storage_over_fp32"]["decode"] == pytest.approx(
        b16w["decode_tokens_per_s"] / f32["decode_tokens_per_s"]
    )
    assert set(d["faster"].values()) <= {"float32", "bfloat16", "float32+bf16", "float32+int8"}


def test_structured_workload(tmp_path):
    from qwen35.benchmarks.runner import run_bench
    from tiny import VOCAB_REAL

    # the real vocabulary: grammars are compiled against the Qwen 3.5 tokenizer
    d = tiny_config_dict(model_type="qwen3_5_text", vocab_size=VOCAB_REAL, hidden_size=32)
    d["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    opts = BenchOptions(model=str(tmp_path / "config.json"), quick=True, baseline=False)
    doc = run_bench(opts, ["structured"])
    s = doc["workloads"]["structured"]
    assert s["num_steps_timed"][0] > 0 and s["num_steps_timed"][1] > 0
    for k in ("step_ms_unconstrained", "step_ms_constrained", "mask_ms_per_step",
              "compile_ms_median", "vocab_build_s"):  # fmt: skip
        assert _finite_positive(s[k]), k
    assert len(s["compile_ms"]) == 3 and [g["name"] for g in doc["goals"]] == [
        g["name"] for g in s["goals"]
    ]
    from rich.console import Console

    from qwen35.benchmarks.report import print_workload

    buf = io.StringIO()  # what `qwen35 bench --workload structured` prints (it raised a TypeError)
    print_workload(doc, "structured", Console(file=buf, width=200))
    assert "constrained" in buf.getvalue()


def test_hf_model_shares_our_weights(tiny_cfg):
    from qwen35.benchmarks.hf_baseline import build_hf_model

    bm = load_bench_model(BenchOptions(model=tiny_cfg, dtype="fp32"))
    hf = build_hf_model(bm.model)
    ours = dict(bm.model.named_parameters())
    for name, p in hf.named_parameters():
        assert p.data_ptr() == ours[name].data_ptr(), name
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, bm.model(ids), rtol=1e-4, atol=1e-5)


def test_cli_json_out(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--model", tiny_cfg, "--quick", "--workload", "long-context"]
    rc = main([*argv, "--no-baseline", "--contexts", "16,48", "--json", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert list(printed["workloads"]) == ["long_context"] and printed["baseline"] is False
    assert printed["goals"] == []


def test_cli_errors(tiny_cfg, capsys):
    assert main(["bench", "--model", "Qwen3.5-0.7B", "--quick", "--no-baseline"]) == 2
    assert "Qwen3.5-0.8B" in capsys.readouterr().err  # did-you-mean
    assert main(["bench", "--model", tiny_cfg, "--requests", "0"]) == 2
    assert "--requests" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--contexts", "1k,x"])
    assert e.value.code == 2


def test_peers_formats_are_checked_before_any_model_loads(monkeypatch, capsys):
    """A --formats the peers workload cannot run is refused at once, not after the minutes of
    loading the model (a 4B took 3.5 of them)."""
    from qwen35.benchmarks import common, runner

    def no_load(*a, **k):
        raise AssertionError("the model loaded before --formats was checked")

    for mod in (common, runner):
        monkeypatch.setattr(mod, "load_bench_model", no_load)
    assert main(["bench", "--workload", "peers", "--formats", "int4,int8"]) == 2
    assert "--formats takes bf16 and any of" in capsys.readouterr().err
    assert main(["bench", "--workload", "peers", "--formats", "bf16,int5"]) == 2
    assert "int5" in capsys.readouterr().err


def test_baseline_label_names_each_kernel_package(monkeypatch):
    """transformers takes fla's delta rule and causal-conv1d's conv each where importable; the
    label must not call a run with fla "torch fallback" (the H200 run has fla, not the conv)."""
    import importlib.util

    from qwen35.benchmarks import hf_baseline

    def have(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda m: object() if m in names else None)

    have("fla")
    assert hf_baseline.implementation("cuda") == "fla delta rule, torch conv"
    assert hf_baseline.implementation("cpu") == hf_baseline.FALLBACK
    have("fla", "causal_conv1d")
    assert hf_baseline.implementation("cuda") == "flash-linear-attention kernels"
    have()
    assert hf_baseline.implementation("cuda") == hf_baseline.FALLBACK


def test_timed_request_counts_every_prefill_chunk(tiny_cfg):
    """A prompt longer than a step's token budget takes several steps before its first token:
    all of them are prefill, and the decode steps are exactly the later ones."""
    from qwen35.benchmarks.common import make_engine, timed_request

    bm = load_bench_model(BenchOptions(model=tiny_cfg, dtype="fp32", threads=1))
    engine = make_engine(bm, max_num_batched_tokens=16, max_num_seqs=1, max_model_len=128)
    calls = []
    real = engine.step
    engine.step = lambda: calls.append(1) or real()
    prefill, steps, tokens = timed_request(engine, list(range(3, 43)), 5, "chunked")
    assert len(tokens) == 5 and len(steps) == 4  # the first token ends the prefill
    assert len(calls) == 3 + 4 and prefill > 0  # 40 prompt tokens: 3 chunks of <= 16


def test_timed_batch_times_only_steps_that_decode_every_sequence(tiny_cfg):
    """Batched decode (peers --batches): prompts longer than a step's budget are prefilled over
    several steps, some sequences decoding meanwhile; only later steps, each decoding all B, are
    timed, and the requests are gone afterwards (the engine is free for the next run)."""
    from qwen35.benchmarks.common import make_engine, timed_batch

    bm = load_bench_model(BenchOptions(model=tiny_cfg, dtype="fp32", threads=1))
    engine = make_engine(bm, max_num_batched_tokens=24, max_num_seqs=3, max_model_len=64)
    rows = []
    step = engine.step

    def counting():
        outs = step()
        rows.append(len(outs))
        return outs

    engine.step = counting
    prompts = [list(range(3 + i, 23 + i)) for i in range(3)]  # 60 prompt tokens: 3+ steps
    times = timed_batch(engine, prompts, 5, "b")
    assert len(times) == 5 and all(t > 0 for t in times)
    assert rows[-5:] == [3] * 5 and len(rows) > 5  # prefill steps first, untimed
    assert not engine.has_unfinished_requests()
    # a sequence that finishes during the timed steps is an error, not a smaller batch
    small = make_engine(bm, max_num_seqs=2, max_model_len=24)
    with pytest.raises(RuntimeError, match="decoded"):
        timed_batch(small, [list(range(3, 23)), list(range(4, 24))], 8, "short")
    assert not small.has_unfinished_requests()


def test_decode_workload_with_scheduler_steps(tiny_cfg):
    """--scheduler-steps 3: the K-step engine and a single-step one on the same weights, round
    by round (their tokens must agree, or the workload fails), at batch 1 and batched; a round's
    time counts as its K tokens'; timed_batch spreads a round over its tokens."""
    from qwen35.benchmarks.common import make_engine, timed_batch
    from qwen35.benchmarks.runner import run_bench

    opts = BenchOptions(model=tiny_cfg, quick=True, baseline=False, batches=(2,),
                        scheduler_steps=3)  # fmt: skip
    d = run_bench(opts, ["decode"])["workloads"]["decode"]
    assert d["ours"]["num_scheduler_steps"] == 3
    assert _finite_positive(d["single_step"]["ms_per_token"])
    assert _finite_positive(d["multi_step_speedup"])
    (b,) = d["batched"]
    assert b["num_scheduler_steps"] == 3 and _finite_positive(b["multi_step_speedup"])
    bm = load_bench_model(BenchOptions(model=tiny_cfg, dtype="fp32", threads=1))
    engine = make_engine(bm, max_num_seqs=2, max_model_len=64, num_scheduler_steps=3)
    times = timed_batch(engine, [list(range(3, 13)), list(range(4, 14))], 6, "k3")
    assert len(times) == 6 and times[0] == times[1] == times[2]  # one round: 3 equal shares


def test_bench_batches_flag():
    from qwen35.commands.bench import _batches

    assert _batches("4,16") == (4, 16)
    for bad in ("0", "x", "", "300"):
        with pytest.raises(Exception, match="--batches"):
            _batches(bad)


@pytest.mark.slow
def test_llama_cpp_batched_runner(tiny_cfg):
    """llama.cpp's batched decode (peers --batches): B sequences in one context, each step one
    token a sequence at its own next position. Needs llama-cpp-python and its converter."""
    from qwen35.benchmarks import gguf

    if (why := gguf.available()) is not None:
        pytest.skip(f"llama.cpp: {why}")
    import llama_cpp

    opts = BenchOptions(model=tiny_cfg, quick=True, threads=1)
    bm = load_bench_model(opts)
    try:
        runner = gguf.LlamaRunner(gguf.convert(bm, "f32", opts), 64, 1)
        batch = gguf.LlamaBatchRunner(runner, 3, 24, 1)
        prompts = [[5 + s] * 10 for s in range(3)]
        times = batch.run(prompts, 4)
        assert len(times) == 4 and all(t > 0 for t in times)
        mem = llama_cpp.llama_get_memory(batch.ctx.ctx)
        assert [llama_cpp.llama_memory_seq_pos_max(mem, s) for s in range(3)] == [13] * 3
        batch.run(prompts, 2)  # the context is cleared between runs
        assert [llama_cpp.llama_memory_seq_pos_max(mem, s) for s in range(3)] == [11] * 3
        # batch 1, one decode step at a time (peers alternates them with ours)
        assert len(list(runner.steps([5] * 10, 4))) == 3 and runner.llm.n_tokens == 13
        prefill, steps = runner.run([5] * 10, 4)
        assert prefill > 0 and len(steps) == 3 and runner.llm.n_tokens == 13
    finally:
        gguf.cleanup()


def test_peers_removes_its_converted_weights(tiny_cfg, monkeypatch):
    """The peers workload's transformers checkpoint and GGUF files (GBs for a real model) are
    deleted when the workload ends, also when it fails."""
    from qwen35.benchmarks import gguf, peers

    opts = BenchOptions(model=tiny_cfg, quick=True, threads=None)
    bm = load_bench_model(opts)
    made = []

    def failing(bm, opts, g):
        made.append(g._hf_dir(bm, opts))  # what convert() writes first
        assert (made[0] / "model.safetensors").is_file()
        raise RuntimeError("a converter failure")

    monkeypatch.setattr(peers, "_run_peers", failing)
    with pytest.raises(RuntimeError, match="converter failure"):
        peers.run_peers(bm, opts)
    assert made and not made[0].parent.exists() and "hf" not in gguf._WORK


def test_spec_workload(tmp_path, tiny_cfg):
    """Speculative decoding vs plain on a tiny config with an MTP head: every engine's greedy
    tokens equal the plain engine's, the oracle rows' acceptance follows their rate (100%:
    every draft right), the MTP row drafts with the head."""
    from qwen35.benchmarks.runner import run_bench

    d = tiny_config_dict(model_type="qwen3_5_text", vocab_size=512, mtp_num_hidden_layers=1)
    d["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(d))
    doc = run_bench(BenchOptions(model=str(cfg), quick=True, rounds=2), ["spec"])
    s = doc["workloads"]["spec"]
    rows = s["engines"]
    kinds = ["mtp", "oracle 100%", "oracle 80%", "oracle 60%"]
    fixed = ["adaptive oracle 80%", "adaptive oracle 60%"]
    assert list(rows) == ["plain"] + [f"k=1 {n}" for n in kinds] + [
        f"k=3 {n}" for n in kinds + fixed]
    assert all(r["tokens_equal_plain"] for r in rows.values())
    assert all(_finite_positive(r["decode_tokens_per_s"]) for r in rows.values())
    for k in (1, 3):
        right = rows[f"k={k} oracle 100%"]
        assert right["acceptance"] == 1.0 and rows[f"k={k} mtp"]["drafts"] > 0
        # always-right drafts: k + 1 tokens a step (fewer only where the request ends: the
        # scheduler gives no draft positions past max_tokens)
        assert k + 0.5 <= right["accept_length"] <= k + 1
    assert rows["plain"]["over_plain"] == 1.0 and rows["plain"]["acceptance"] is None
    assert set(s["batches"]) == {"k=1", "k=3"} and s["max_verify_seqs"] == 2
    assert all(set(b) == {"2", "4"} for b in s["batches"].values())
    assert all(_finite_positive(b["oracle 100%"]) for per in s["batches"].values()
               for b in per.values())  # fmt: skip
    two = run_bench(BenchOptions(model=str(cfg), quick=True, draft_tokens=(2,)), ["spec"])
    assert list(two["workloads"]["spec"]["engines"])[1:] == [f"k=2 {n}" for n in kinds + fixed]
    from qwen35.commands.bench import _draft_tokens

    assert _draft_tokens("1,2") == (1, 2) and _draft_tokens(None) is None
    for bad in ("0", "6", "x", "1,,2"):
        with pytest.raises(Qwen35Error, match="--draft-tokens takes"):
            _draft_tokens(bad)
    with pytest.raises(Qwen35Error, match="no MTP head"):  # a config without one
        run_bench(BenchOptions(model=tiny_cfg, quick=True), ["spec"])


def test_decode_report_shows_the_gpu_profile_and_batches(doc):
    """The decode table's GPU lines (filled on CUDA only): kernels per token, busy time, the
    kernels that take it, and the batched rows."""
    import copy
    import io

    from rich.console import Console

    from qwen35.benchmarks.report import print_workload

    d = copy.deepcopy(doc)
    d["workloads"]["decode"]["ours"]["gpu_profile"] = {
        "steps": 8, "kernels_per_token": 535.0, "gpu_busy_ms_per_token": 4.83,
        "wall_ms_per_token": 7.48, "gpu_busy_fraction": 0.65, "cuda_graphs": True,
        "backend": "cuda+fla", "top_kernels": [
            {"name": "_moe_gate_up_kernel", "per_token": 40.0, "us_per_token": 1234.5}],
    }  # fmt: skip
    buf = io.StringIO()
    print_workload(d, "decode", Console(file=buf, width=400))
    out = buf.getvalue()
    assert "535 kernels per token, busy 4.83 of 7.48 ms (65%)" in out
    assert "1234.5 us" in out and "_moe_gate_up_kernel" in out
    assert "batched decode, 3 sequences" in out


def test_gpu_idle_gaps_are_found_and_placed():
    """gpu_profile.idle_gaps: overlapping kernels leave no gap; gaps under 5 us are not idle;
    the longest place (the kernels either side) first, per token."""
    from qwen35.benchmarks.gpu_profile import idle_gaps

    spans = [(0, 10, "a"), (5, 12, "b"),  # overlap: none
             (14, 20, "c"),  # 2 us: too short to count
             (120, 130, "sample"), (140, 150, "a"),  # 100 us after c, 10 us after sample
             (350, 360, "sample")]  # 200 us after a  # fmt: skip
    g = idle_gaps(spans, steps=2)
    assert g["gpu_idle_ms_per_token"] == pytest.approx((100 + 10 + 200) / 1e3 / 2)
    assert [(x["after"], x["before"]) for x in g["idle_gaps"]] == [
        ("a", "sample"), ("c", "sample"), ("sample", "a")]
    assert g["idle_gaps"][0]["us_per_token"] == pytest.approx(100)


def test_kernels_by_time_sums_launches_by_name():
    """gpu_profile.kernels_by_time (decode profile and bench/gpu_prefill.py --profile)."""
    from types import SimpleNamespace

    from qwen35.benchmarks.gpu_profile import kernels_by_time

    ev = lambda name, us: SimpleNamespace(  # noqa: E731
        name=name, time_range=SimpleNamespace(elapsed_us=lambda: us))
    events = [ev("gemv", 10.0), ev("norm", 2.0), ev("gemv", 12.0), ev("x" * 150, 5.0)]
    assert kernels_by_time(events) == [("gemv", (2, 22.0)), ("x" * 100, (1, 5.0)),
                                       ("norm", (1, 2.0))]  # fmt: skip
    assert kernels_by_time(events, top=1) == [("gemv", (2, 22.0))]


def test_parameters_are_counted_as_the_config_has_them(tiny_cfg):
    """A quantized model's parameter count is its config's, not its packed tensors' elements
    (int4 holds two a byte: an int4 0.8B was reported as 0.46B)."""
    from qwen35.benchmarks.common import BenchOptions, load_bench_model

    opts = BenchOptions(model=tiny_cfg, dtype="bf16")
    plain = load_bench_model(opts)
    int4 = load_bench_model(opts, quantization="int4")
    assert int4.num_params == plain.num_params == plain.weight_bytes // 2
    assert int4.weight_bytes < plain.weight_bytes / 2
