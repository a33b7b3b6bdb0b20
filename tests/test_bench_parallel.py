"""`qwen35 bench -tp N` (issue 14): the `tp` workload runs one process and 2 ranks on the same
weights (random weights written once as a checkpoint the ranks load) and both emit the same
tokens; `decode` runs our engine on 2 ranks with rank 0's share of the roofline bytes; the other
workloads refuse -tp. No timings are asserted."""

from __future__ import annotations

import json

import pytest

from qwen35.benchmarks.common import BenchOptions, load_bench_model
from qwen35.benchmarks.roofline import decode_bytes_per_step
from qwen35.cli import main
from tiny import tiny_config_dict


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> str:
    d = tiny_config_dict(model_type="qwen3_5_text", vocab_size=512)
    path = tmp_path_factory.mktemp("bench-tp") / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


def _bench(capsys, *argv) -> dict:
    assert main(["bench", "--quick", "--no-baseline", "--dtype", "fp32", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_tp_workload_one_process_vs_two_ranks(tiny_cfg, capsys):
    d = _bench(capsys, "--model", tiny_cfg, "--workload", "tp")["workloads"]["tp"]
    assert d["tensor_parallel_size"] == 2
    engines = {r["engine"] for r in d["rows"]}
    assert {"1 process", "tp=2"} <= engines
    assert {r["workload"] for r in d["rows"]} == {"decode batch 1", "batch 8"}
    assert all(r["tokens_per_s"] > 0 for r in d["rows"])
    assert d["all_same_tokens"]  # fp32: the ranks read exactly the one process's weights
    assert set(d["speedup_vs_1_process"]) == {"decode batch 1", "batch 8"}


def test_tp_workload_with_drafts(tmp_path, capsys):
    """--draft-tokens K: one process and the same 2 ranks also with K MTP drafts (an oracle
    right 80% of the time), every engine's tokens one process's."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config_dict(model_type="qwen3_5_text", vocab_size=512,
                                                mtp_num_hidden_layers=1)))  # fmt: skip
    d = _bench(capsys, "--model", str(path), "--workload", "tp", "--draft-tokens", "2")
    d = d["workloads"]["tp"]
    assert d["draft_tokens"] == 2
    engines = {r["engine"] for r in d["rows"]}
    assert {"1 process", "tp=2", "1 process, k=2 oracle 80%", "tp=2, k=2 oracle 80%"} <= engines
    assert d["all_same_tokens"] and all(r["tokens_per_s"] > 0 for r in d["rows"])


def test_decode_on_two_ranks(tiny_cfg, capsys):
    d = _bench(capsys, "--model", tiny_cfg, "--workload", "decode", "-tp", "2")
    dec = d["workloads"]["decode"]
    assert dec["tensor_parallel_size"] == 2 and dec["ours"]["num_steps_timed"] > 0
    # on a CPU the ranks share one memory bus: 2 x rank 0's bytes ~ one process's bytes
    one = load_bench_model(BenchOptions(model=tiny_cfg, dtype="fp32"))
    ref = decode_bytes_per_step(one.model, dec["prompt_len"] + dec["new_tokens"] // 2)
    assert abs(dec["bytes_per_step"]["total"] - ref["total"]) <= 0.1 * ref["total"]
    assert (
        dec["bytes_per_step"]["kv"] == ref["kv"] and dec["bytes_per_step"]["state"] == ref["state"]
    )


def test_other_workloads_refuse_tp(tiny_cfg, capsys):
    assert (
        main(["bench", "--model", tiny_cfg, "--quick", "--workload", "throughput", "-tp", "2"]) == 2
    )
    assert "applies to the workloads decode, tp, not throughput" in capsys.readouterr().err
