"""`qwen35 generate` and `qwen35 chat` end to end in a subprocess, on a tiny checkpoint with the
real Qwen 3.5 vocabulary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny import VOCAB_REAL, save_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, seed=0)
    return d


def qwen35(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen35.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_generate_streams_text(model_dir):
    args = ["generate", "--model", str(model_dir), "--max-tokens", "6", "--temperature", "0",
            "--ignore-eos", "--max-memory", "256MiB"]  # fmt: skip
    r = qwen35(*args, "--prompt", "Hello there")
    assert r.returncode == 0, r.stderr
    assert "[finish: length]" in r.stderr and r.stdout.strip()
    again = qwen35(*args, stdin="Hello there")  # prompt from standard input
    assert again.returncode == 0 and again.stdout == r.stdout  # greedy: same text
    # the model as a positional argument, as `vllm serve MODEL`: the same run
    positional = qwen35("generate", *args[2:3], *args[3:], "--prompt", "Hello there")
    assert positional.returncode == 0 and positional.stdout == r.stdout, positional.stderr
    # the prompt as one too (`ollama run MODEL PROMPT`), and llama.cpp's -m / -p
    model = args[2]
    for form in ([model, "Hello there", *args[3:]], ["--model", model, "Hello there", *args[3:]],
                 ["-m", model, "-p", "Hello there", *args[3:]]):  # fmt: skip
        again = qwen35("generate", *form)
        assert again.returncode == 0 and again.stdout == r.stdout, (form, again.stderr)


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "run-batch"])
def test_the_model_is_given_once(command, capsys):
    """MODEL or --model MODEL: neither, or two different ones, is a usage error that says so."""
    from qwen35.cli import main

    own = ["-i", "in.jsonl", "-o", "out.jsonl"] if command == "run-batch" else []
    with pytest.raises(SystemExit) as e:
        main([command, *own])
    assert e.value.code == 2 and f"qwen35 {command} MODEL (or --model MODEL)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # (generate: MODEL PROMPT, so a, b and --model c)
        main([command, "a", *(["b"] if command == "generate" else []), "--model", "c", *own])
    assert e.value.code == 2 and "two models given" in capsys.readouterr().err


def test_generate_prompt_given_once(capsys):
    """generate MODEL PROMPT or --prompt: both is a usage error; --model M PROMPT is a prompt."""
    from qwen35.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "hi", "--prompt", "ho"])
    assert e.value.code == 2 and "two prompts given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "m", "hi", "-p", "ho"])
    assert e.value.code == 2 and "two prompts given" in capsys.readouterr().err


def test_generate_thinking_budget(model_dir):
    """--thinking-budget N: with thinking on, </think> comes after N tokens; the text before it is
    the unbudgeted run's."""
    args = ["generate", "--model", str(model_dir), "--chat", "--thinking", "on", "--max-tokens",
            "6", "--temperature", "0", "--ignore-eos", "--max-memory", "256MiB", "--prompt", "Why?"]
    free, capped = qwen35(*args), qwen35(*args, "--thinking-budget", "2")
    assert free.returncode == capped.returncode == 0, capped.stderr
    head, sep, _ = capped.stdout.partition("</think>")
    assert sep and "</think>" not in free.stdout and free.stdout.startswith(head) and head


def test_chat_history_and_reset(model_dir):
    r = qwen35("chat", "--model", str(model_dir), "--max-tokens", "4", "--temperature", "0",
               "--ignore-eos", "--max-memory", "256MiB",
               stdin="Hi!\nAnd again?\n/reset\nHi!\n/exit\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[history cleared]" in r.stderr
    replies = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(replies) == 3
    assert replies[0] == replies[2]  # after /reset the same first turn gives the same reply


def test_bad_model_is_a_clear_error(tmp_path):
    r = qwen35("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["plan", "-m"], ["generate", "--prompt", "x", "--model"]])
def test_a_path_the_os_refuses_is_a_clear_error(command, capsys):
    """A model path the OS refuses (here too long for it) is an error line naming the reason
    and the path (cut to 120 characters), not a traceback; exit status 2."""
    from qwen35.cli import main

    for path in ("x" * 300, "/" + "y" * 300 + "/config.json"):
        assert main([*command, path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: File name too long: ") and err.rstrip().endswith("...")
        assert len(err) < 200
