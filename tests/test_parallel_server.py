"""`qwen35 serve -tp 2` (issue 14): answers an OpenAI chat request and streams; when a worker
dies the server exits non-zero by itself and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from server_fakes import free_port, start_serve
from tiny import VOCAB_REAL, save_checkpoint


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_serve_tp2_chat_stream_and_dead_worker_exit(tmp_path):
    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    proc, url = start_serve(tmp_path / "m", "-tp", "2", "--served-model-name", "tiny",
                            "--max-memory", "512MiB", "--log-level", "warning",
                            timeout=180, env=_no_kernels_env())  # fmt: skip
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "Hi"}]
        extra = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                           extra_body=extra)  # fmt: skip
        assert r.usage.completion_tokens == 4
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                                     stream=True, extra_body=extra))  # fmt: skip
        assert chunks[-1].choices[0].finish_reason == "length" or any(
            c.choices and c.choices[0].finish_reason == "length" for c in chunks
        )
        workers = [p for p in children(proc.pid) if _is_worker(p)]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        code = proc.wait(timeout=60)
        out = proc.stdout.read()
        assert code != 0
        assert "worker rank 1" in out and "killed by signal 9" in out
        time.sleep(0.5)
        assert not children(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_worker(pid: int) -> bool:
    """The spawned worker (not the resource tracker, which multiprocessing also starts)."""
    return "multiprocessing.spawn" in _cmdline(pid) and "spawn_main" in _cmdline(pid)


def _no_kernels_env() -> dict:
    # PyTorch ops, not the compiled kernels: killing these processes must never interrupt a build
    return {**os.environ, "QWEN35_NO_KERNELS": "1"}


def _one_process_run(tmp_path: Path):
    """A tiny checkpoint and a short greedy `qwen35 generate` of it in one process: (its
    arguments after the interpreter, the environment, the finished run) to compare ranks with."""
    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    gen = ["-m", "qwen35.cli", "generate", "--model", str(tmp_path / "m"), "--prompt", "Hi",
           "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]  # fmt: skip
    env = _no_kernels_env()
    return gen, env, subprocess.run([sys.executable, *gen], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_torchrun_two_ranks_generate_like_one_process(tmp_path):
    """The multi-node path on one machine: torchrun starts both ranks of the same command."""
    gen, env, one = _one_process_run(tmp_path)
    port = free_port()
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(port), *gen, "-tp", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()


@pytest.mark.slow
def test_torchrun_two_nodes_generate_like_one_process(tmp_path):
    """The README's multi-node command, as 2 nodes x 1 process on this machine: two torchrun
    agents meet at a c10d rendezvous; whichever becomes rank 0 runs the engine and prints the
    text (c10d assigns ranks in arrival order and ignores --node-rank), the other serves as its
    worker; both exit 0 and the tokens are one process's."""
    gen, env, one = _one_process_run(tmp_path)
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(r),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"localhost:{port}",
                *gen,
                "-tp",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert one.returncode == 0 and one.stdout.strip()
    assert [p.returncode for p in nodes] == [0, 0], [e[-2000:] for _, e in outs]
    printed = sorted(o for o, _ in outs)
    assert printed == ["", one.stdout]  # rank 0's node prints the text, the worker's nothing


@pytest.mark.slow
def test_torchrun_two_ranks_serve(tmp_path):
    """`qwen35 serve -tp 2` under torchrun on one machine: both ranks run the command; rank 0
    binds the HTTP port (before loading) and serves it, rank 1 becomes its worker (it binds
    nothing: the socket is rank 0's alone)."""
    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()))  # fmt: skip
    proc, url = start_serve(tmp_path / "m", "-tp", "2", "--served-model-name", "tiny",
                            "--max-memory", "512MiB", "--log-level", "warning", timeout=240,
                            env=_no_kernels_env(), launcher=torchrun)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="tiny", prompt="Hi", max_tokens=3,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
