"""`qwen35 serve` accepts the vLLM flags the Qwen 3.5 recipes pass (commands/vllm_flags.py):
the parsers Qwen 3.5's formats need are accepted (others refused naming the choices), and the
mapped ones become this engine's options before anything loads."""

from __future__ import annotations

import pytest

from qwen35.cli import build_parser
from qwen35.commands import vllm_flags
from qwen35.engine.config import EngineConfig
from qwen35.errors import Qwen35Error

RECIPE = ["serve", "Qwen/Qwen3.5-35B-A3B", "--port", "8000", "--max-model-len", "262144",
          "--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser",
          "qwen3_coder", "--trust-remote-code", "--enable-prefix-caching",
          "--enable-chunked-prefill", "--disable-log-requests", "--disable-log-stats"]  # fmt: skip


def parse(argv):
    args = build_parser(argv).parse_args(argv)
    args.model = args.model or args.model_arg
    vllm_flags.apply(args)
    return args


def test_a_recipe_command_line_parses_to_the_same_engine():
    args = parse(RECIPE)
    plain = parse(["serve", "Qwen/Qwen3.5-35B-A3B", "--port", "8000", "--max-model-len", "262144"])
    assert EngineConfig.from_cli(args) == EngineConfig.from_cli(plain)


def test_mapped_flags():
    off = EngineConfig.from_cli(parse(["serve", "m", "--no-enable-prefix-caching"]))
    assert not off.cache.enable_prefix_caching
    args = parse(["serve", "m", "--language-model-only", "--speculative-config",
                  '{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}'])  # fmt: skip
    cfg = EngineConfig.from_cli(args)
    assert cfg.multimodal.text_only and cfg.scheduler.num_speculative_tokens == 2
    assert cfg.scheduler.speculative_method == "mtp"
    args = parse(["serve", "m", "--speculative-config",
                  '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'])
    cfg = EngineConfig.from_cli(args)
    assert (cfg.scheduler.speculative_method, cfg.scheduler.num_speculative_tokens,
            cfg.scheduler.prompt_lookup_max) == ("ngram", 3, 5)  # fmt: skip


@pytest.mark.parametrize("extra, says", [
    (["--speculative-config", "{bad"], "not JSON"),
    (["--speculative-config", '{"method": "eagle3"}'], "eagle3"),
    (["--speculative-config", '{"model": "x"}'], "model not supported"),
    (["--speculative-config", '{"num_speculative_tokens": "2"}'], "must be an integer"),
    (["--gpu-memory-utilization", "0.9"], "--device cuda"),
    (["--gpu-memory-utilization", "1.5", "--device", "cuda"], "(0, 1]"),
    (["--gpu-memory-utilization", "0.5", "--max-memory", "8GiB"], "not both"),
])  # fmt: skip
def test_bad_values_are_clear_errors(extra, says):
    with pytest.raises(Qwen35Error, match=says.replace("(", r"\(").replace("]", r"\]")):
        parse(["serve", "m", *extra])


def test_parsers_for_other_formats_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "m", "--tool-call-parser", "hermes"])
    assert "qwen3_coder" in capsys.readouterr().err


def test_gpu_memory_utilization_on_a_gpu(monkeypatch):
    import torch

    free = [79 << 30]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[0], 80 << 30))
    assert vllm_flags.gpu_memory(0.5, "cuda", None) == str(40 << 30)
    args = parse(["serve", "m", "--device", "cuda:0", "--gpu-memory-utilization", "0.25"])
    assert EngineConfig.from_cli(args).cache.max_memory == str(20 << 30)
    free[0] = 30 << 30  # another process holds 50 GiB
    with pytest.raises(Qwen35Error, match="only 30.0 GiB are free"):
        vllm_flags.gpu_memory(0.5, "cuda", None)


def test_long_prefill_token_threshold_reaches_the_scheduler(tmp_path):
    from test_engine import make
    from tiny import save_checkpoint

    args = parse(["serve", "m", "--long-prefill-token-threshold", "300"])
    assert EngineConfig.from_cli(args).scheduler.short_prompt_tokens == 300
    save_checkpoint(tmp_path / "m")
    llm = make(tmp_path / "m", short_prompt_tokens=300)
    assert llm.engine.scheduler.config.short_prompt_tokens == 300
    with pytest.raises(Qwen35Error, match="short_prompt_tokens"):
        make(tmp_path / "m", short_prompt_tokens=-1)


def test_vllm_dtype_names():
    """--dtype bfloat16 (vLLM's / torch's names) is --dtype bf16; likewise the cache dtypes and
    LLM(dtype="bfloat16"); the help lists this engine's names only."""
    args = parse(["serve", "m", "--dtype", "bfloat16", "--kv-cache-dtype", "fp8_e4m3",
                  "--mamba-ssm-cache-dtype", "bfloat16"])  # fmt: skip
    cfg = EngineConfig.from_cli(args)
    assert (cfg.load.dtype, cfg.cache.kv_cache_dtype, cfg.cache.mamba_ssm_cache_dtype) == (
        "bf16", "fp8", "bf16")
    assert EngineConfig.create("m", dtype="half").load.dtype == "fp16"
    help_text = build_parser(["serve"]).parse_args(["serve", "m"])._parser.format_help()
    assert "--dtype {auto,bf16,fp16,fp32}" in help_text and "bfloat16" not in help_text
    with pytest.raises(SystemExit):
        parse(["serve", "m", "--dtype", "int3"])
