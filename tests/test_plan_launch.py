"""`qwen35 plan` prints how to start the layout it recommends (issue 14): our own command
(`torchrun` beyond one node), vLLM's and SGLang's."""

from __future__ import annotations

import json

from qwen35.catalog import load_model_config
from qwen35.cli import main
from qwen35.plan.launch import launch_commands
from qwen35.plan.planner import Deployment


def test_one_node_and_two_nodes():
    dep = Deployment(load_model_config("27B"), "bf16", tp=2)
    cmds = launch_commands(dep, 32768)
    assert cmds["qwen35"] == (
        "qwen35 serve --model Qwen/Qwen3.5-27B -tp 2 --max-model-len 32768 --device cuda"
    )
    assert cmds["vllm"].startswith("vllm serve Qwen/Qwen3.5-27B --tensor-parallel-size 2")
    assert "--tp 2" in cmds["sglang"] and "--nnodes" not in cmds["sglang"]
    big = Deployment(load_model_config("397B-A17B"), "fp8", tp=16, ep=True)
    cmds = launch_commands(big, 8192)
    assert cmds["qwen35"].startswith("torchrun --nnodes 2 --nproc-per-node 8 --node-rank ")
    assert "-m qwen35.cli serve --model Qwen/Qwen3.5-397B-A17B-FP8 -tp 16" in cmds["qwen35"]
    assert (
        "--enable-expert-parallel" in cmds["qwen35"] and "--enable-expert-parallel" in cmds["vllm"]
    )
    assert "--nnodes 2" in cmds["sglang"] and "--ep-size 16" in cmds["sglang"]


def test_plan_json_recommendation_has_launch(capsys):
    assert main(["plan", "--gpu", "H100", "-n", "8", "--context", "32K", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert f"-tp {rec['tp']}" in rec["launch"]["qwen35"]
    assert set(rec["launch"]) == {"qwen35", "vllm", "sglang"}


def test_cache_dtypes_reach_every_command():
    """A plan with --kv-dtype fp8 (and --state-dtype bf16) launches engines that allocate what
    it planned: qwen35's --kv-cache-dtype fp8, vLLM's fp8 / bfloat16 SSM cache, SGLang's."""
    dep = Deployment(load_model_config("27B"), "bf16", kv_dtype="fp8", state_dtype="bf16", tp=2)
    cmds = launch_commands(dep, 32768)
    assert cmds["qwen35"].endswith(" --kv-cache-dtype fp8 --mamba-ssm-cache-dtype bf16")
    assert "--kv-cache-dtype fp8 --mamba-ssm-cache-dtype bfloat16" in cmds["vllm"]
    assert "--kv-cache-dtype fp8_e4m3 --mamba-ssm-dtype bfloat16" in cmds["sglang"]
    plain = launch_commands(Deployment(load_model_config("27B"), "bf16", tp=2), 32768)
    assert not any("dtype" in c for c in plain.values())
