"""EngineConfig: one frozen object from LLM(**kwargs) or the CLI flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from qwen35.engine.config import EngineConfig
from qwen35.errors import Qwen35Error


def test_flat_options_land_in_their_parts():
    cfg = EngineConfig.create("m", max_num_seqs=4, block_size=32, device="cpu", seed=7)
    assert cfg.scheduler.max_num_seqs == 4 and cfg.cache.block_size == 32
    assert cfg.device.device == "cpu" and cfg.seed == 7 and cfg.load.model == "m"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scheduler.max_num_seqs = 8  # type: ignore[misc]


def test_unknown_option_suggests_the_near_one():
    with pytest.raises(Qwen35Error, match="max_num_seqs"):
        EngineConfig.create("m", max_num_seq=4)


@pytest.mark.parametrize(
    "opts",
    [{"max_num_seqs": 0}, {"block_size": -1}, {"max_model_len": 1}, {"threads": 0},
     {"threads": 99999999999},  # torch's ValueError (Overflow when unpacking long) before
     {"device": "tpu"}, {"device": "cuda:x"}],  # (device tpu: torch's RuntimeError before)
)  # fmt: skip
def test_invalid_values_are_refused(opts):
    with pytest.raises(Qwen35Error):
        EngineConfig.create("m", **opts)


def test_device_strings_accepted():
    for dev in ("cpu", "cuda", "cuda:1"):
        assert EngineConfig.create("m", device=dev).device.device == dev


def test_cli_flags_come_from_the_fields():
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_arguments(p)
    args = p.parse_args(
        ["--model", "x", "--max-num-seqs", "3", "--no-prefix-caching", "--dtype", "fp32"]
    )
    cfg = EngineConfig.from_cli(args)
    assert cfg.load.model == "x" and cfg.load.dtype == "fp32"
    assert cfg.scheduler.max_num_seqs == 3 and cfg.cache.enable_prefix_caching is False
    # defaults of the parser are the dataclass defaults
    default = EngineConfig.from_cli(p.parse_args(["--model", "x"]))
    assert default == EngineConfig.create("x")


def test_replace_keeps_the_rest():
    cfg = EngineConfig.create("m", max_num_seqs=4).replace(block_size=8)
    assert cfg.scheduler.max_num_seqs == 4 and cfg.cache.block_size == 8
