"""generation_config.py: a checkpoint's generation_config.json as request defaults (vLLM's
--generation-config auto): valid keys taken, bad ones skipped with a warning, the engine and
LLM.generate use them, `generation_config="none"` does not."""

from __future__ import annotations

import json
import logging

import pytest

from qwen35.generation_config import sampling_defaults
from qwen35.request import SamplingParams
from tiny import save_checkpoint


def test_sampling_defaults_reads_valid_keys_and_skips_bad_ones(tmp_path, caplog):
    assert sampling_defaults(tmp_path) == {}  # no file
    assert sampling_defaults(None) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": [1, 2],
        "min_p": -1.0, "repetition_penalty": "high",
    }))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="qwen35"):
        got = sampling_defaults(tmp_path)
    assert got == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert "min_p" in caplog.text and "repetition_penalty" in caplog.text
    (tmp_path / "generation_config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="qwen35"):
        assert sampling_defaults(tmp_path) == {}
    assert "not valid JSON" in caplog.text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gencfg") / "dense"
    save_checkpoint(d, moe=False)
    (d / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "top_k": 20, "top_p": 0.8, "eos_token_id": 1})
    )
    return d


def test_engine_and_llm_use_the_defaults(ckpt):
    from qwen35.engine.llm_engine import LLM

    llm = LLM(str(ckpt), dtype="fp32", verbose=False)
    assert llm.engine.default_sampling == {"temperature": 0.0, "top_k": 20, "top_p": 0.8}
    p = llm.default_params()
    assert (p.temperature, p.top_k, p.top_p) == (0.0, 20, 0.8)
    # without params: the checkpoint's greedy default, so two runs agree
    a = llm.generate([[5, 6, 7]])[0].outputs[0].token_ids
    b = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0))[0].outputs[0].token_ids
    assert a == b
    off = LLM(str(ckpt), dtype="fp32", verbose=False, generation_config="none")
    assert off.engine.default_sampling == {} and off.default_params() == SamplingParams()


def test_override_generation_config(ckpt, capsys):
    """vLLM's --override-generation-config: defaults over the checkpoint's (auto) or over
    OpenAI's (none), penalties included; a key or value the engine cannot take is refused with
    the reason, on the command line as a usage error."""
    from qwen35.cli import main
    from qwen35.engine.llm_engine import LLM
    from qwen35.errors import Qwen35Error

    over = {"top_p": 0.5, "presence_penalty": 1.5}
    llm = LLM(str(ckpt), dtype="fp32", verbose=False, override_generation_config=over)
    assert llm.engine.default_sampling == {"temperature": 0.0, "top_k": 20, "top_p": 0.5,
                                           "presence_penalty": 1.5}  # fmt: skip
    assert llm.default_params().presence_penalty == 1.5
    off = LLM(str(ckpt), dtype="fp32", verbose=False, generation_config="none",
              override_generation_config=over)  # fmt: skip
    assert off.engine.default_sampling == over
    for bad, why in (({"max_new_tokens": 5}, "not a request default"),
                     ({"top_p": 2.0}, "top_p=2.0"), ({"top_k": "20"}, "not a number"),
                     ([1], "must be a JSON object")):  # fmt: skip
        with pytest.raises(Qwen35Error, match=why):
            LLM(str(ckpt), dtype="fp32", verbose=False, override_generation_config=bad)
    with pytest.raises(SystemExit):
        main(["generate", str(ckpt), "--override-generation-config", "{temperature: 1}"])
    assert "not JSON" in capsys.readouterr().err


def test_generate_and_chat_take_the_models_defaults(ckpt, monkeypatch, capsys):
    """`qwen35 generate` / `chat`: a sampling flag given wins; one not given takes the model's
    request default (generation_config.json, --override-generation-config), else the
    commands' own (temperature 0.7, top_p 0.8, top_k 20)."""
    from qwen35.cli import main
    from qwen35.engine.llm_engine import LLM

    seen = []

    def stream(self, prompt, params, lora=None):
        seen.append(params)
        return iter(())

    monkeypatch.setattr(LLM, "stream", stream)
    base = ["generate", str(ckpt), "--dtype", "fp32", "--prompt", "hi", "--max-tokens", "2"]
    assert main(base) == 0  # the checkpoint's: temperature 0, top_k 20, top_p 0.8
    assert (seen[-1].temperature, seen[-1].top_k, seen[-1].top_p) == (0.0, 20, 0.8)
    assert main([*base, "--temperature", "0.3", "--override-generation-config",
                 '{"top_p": 0.5, "frequency_penalty": 0.5}']) == 0  # fmt: skip
    p = seen[-1]
    assert (p.temperature, p.top_p, p.top_k, p.frequency_penalty) == (0.3, 0.5, 20, 0.5)
    for none in ("none", "vllm"):  # (vLLM's name for it)
        assert main([*base, "--generation-config", none]) == 0  # the commands' own
        assert (seen[-1].temperature, seen[-1].top_p, seen[-1].top_k) == (0.7, 0.8, 20)
    lines = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert main(["chat", str(ckpt), "--dtype", "fp32", "--top-k", "7"]) == 0
    assert (seen[-1].temperature, seen[-1].top_k) == (0.0, 7)
    assert main([*base, "--top-p", "7"]) == 2  # refused before the model loads
    assert "top_p" in capsys.readouterr().err
