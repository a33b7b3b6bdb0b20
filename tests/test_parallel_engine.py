"""Tensor / expert parallelism end to end on the CPU (issue 14): 2 ranks (gloo, a spawned
worker; all-reduces through shared memory where its module builds) against one process on tiny
checkpoints whose dims exercise replication (1 KV head, a vocabulary of 257); logits of every
step within 1e-5 and identical greedy tokens under chunked prefill, prefix caching and
preemption; a killed worker fails fast; each rank's memory is the planner's per-GPU figure."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from contextlib import redirect_stdout

import pytest
import torch

from qwen35.engine.llm_engine import LLM
from qwen35.parallel import shm
from qwen35.parallel.group import WorkerDiedError
from qwen35.request import SamplingParams
from tiny import save_checkpoint

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp") / "dense"
    save_checkpoint(d, num_key_value_heads=1, vocab_size=257)
    return d


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp") / "moe"
    save_checkpoint(d, moe=True, experts="per_expert", tie_word_embeddings=True)
    return d


def workload(seed: int = 0) -> list[list[int]]:
    """Mixed lengths, with shared prefixes (prefix-cache hits on the second pass)."""
    rng = random.Random(seed)
    base = [rng.randrange(2, 256) for _ in range(40)]
    out = [[rng.randrange(2, 256) for _ in range(rng.randrange(3, 60))] for _ in range(3)]
    return out + [base + [rng.randrange(2, 256) for _ in range(n)] for n in (5, 17)]


def run(d, **kw) -> tuple[list[list[int]], list[torch.Tensor], dict]:
    """Greedy tokens of two passes (the second hits the prefix cache), every step's logits."""
    llm = LLM(str(d), dtype="fp32", verbose=False, block_size=8, max_num_batched_tokens=32,
              num_kv_blocks=20, max_model_len=80, **kw)  # fmt: skip
    try:
        toks, logits = generate_with_logits(llm, [workload(), workload()[-2:]], GREEDY)
        return toks, logits, {**llm.engine.get_stats(), "rank_memory": llm.engine.rank_memory}
    finally:
        llm.engine.shutdown()


def generate_with_logits(llm, batches, params) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each batch of prompts generated in turn: every request's tokens and every model step's
    logits (those of steps that sample from the int8 screen of lm_head, models/head_screen.py,
    do not come back: pass head_screen=False for all)."""
    logits: list[torch.Tensor] = []
    inner = llm.engine.runner.run_model

    def spy(ids, batch):
        out = inner(ids, batch)
        logits.append(out.clone())
        return out

    llm.engine.runner.run_model = spy
    try:
        toks = [o.outputs[0].token_ids for b in batches for o in llm.generate(b, params)]
        return toks, logits
    finally:
        llm.engine.runner.run_model = inner


@pytest.mark.parametrize(
    "which,ep",
    [("dense", False), pytest.param("moe", False, marks=pytest.mark.slow), ("moe", True)],
)
def test_two_ranks_equal_one_process(which, ep, dense, moe):
    d = dense if which == "dense" else moe
    ref_tokens, ref_logits, ref_stats = run(d, head_screen=False)  # every step's logits
    calls, bcasts = shm.calls, shm.bcasts
    tokens, logits, stats = run(d, tensor_parallel_size=2, enable_expert_parallel=ep)
    assert tokens == ref_tokens
    if shm.SHM.load() is not None:  # the all-reduces and steps went through shared memory
        assert shm.calls > calls and shm.bcasts > bcasts
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the workload did exercise what it claims to
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert stats["num_preemptions"] == ref_stats["num_preemptions"]
    assert not multiprocessing.active_children()  # the worker exited


def test_killed_worker_fails_fast_and_leaves_nothing(dense):
    llm = LLM(str(dense), tensor_parallel_size=2, dtype="fp32", verbose=False)
    worker = llm.engine.workers.procs[0]
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) was killed by signal 9"):
        llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=4000, ignore_eos=True))
    assert time.monotonic() - t0 < 10
    with pytest.raises(WorkerDiedError):  # and every later step says so too
        llm.generate([[5, 6]], GREEDY)
    llm.engine.shutdown()
    assert not multiprocessing.active_children()


def test_a_script_that_builds_the_engine_at_import_says_how_to_fix_it(dense, tmp_path):
    """Spawned workers import the user's script again as their __main__: one that creates
    LLM(tensor_parallel_size=2) at import time kills every worker before it can report
    anything, and the error said only "exited (1)". It now says to put the call under
    `if __name__ == "__main__":`; the guarded script runs."""
    import subprocess
    import sys

    body = (f"from qwen35.engine.llm_engine import LLM\n"
            f"llm = LLM({str(dense)!r}, tensor_parallel_size=2, dtype='fp32', verbose=False)\n"
            "print('tokens', llm.generate([[5, 6, 7]])[0].outputs[0].token_ids)\n"
            "llm.engine.shutdown()\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = tmp_path / "unguarded.py"
    script.write_text(body)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode != 0 and 'if __name__ == "__main__":' in r.stderr.splitlines()[-1]
    guarded = tmp_path / "guarded.py"
    lines = body.splitlines()
    guarded.write_text(lines[0] + "\nif __name__ == '__main__':\n" +
                       "".join(f"    {ln}\n" for ln in lines[1:]))  # fmt: skip
    r = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and "tokens [" in r.stdout, r.stderr[-2000:]


# ---- speculative decoding on two ranks ---------------------------------------------------------
@pytest.fixture(scope="module")
def dense_mtp(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp") / "dense-mtp"
    save_checkpoint(d, num_key_value_heads=1, vocab_size=257, mtp=True)
    return d


@pytest.fixture(scope="module")
def moe_mtp(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp") / "moe-mtp"
    save_checkpoint(d, moe=True, experts="per_expert", mtp=True, tie_word_embeddings=True)
    return d


GREEDY_10 = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = [SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True)
          for s in range(3)]  # fmt: skip


def spec_run(d, drafts: dict | None, wrong: float, **kw) -> tuple[list, list, dict]:
    """Greedy tokens of the workload's two passes, seeded samples of three prompts, the MTP
    head's output rows of every pass (drafts: engine options; an oracle drafts the plain
    engine's next token, `wrong` of them corrupted, so drafts are accepted and rejected)."""
    llm = LLM(str(d), dtype="fp32", verbose=False, block_size=8, max_num_batched_tokens=32,
              num_kv_blocks=16, max_model_len=80, **(drafts or {}), **kw)  # fmt: skip
    mtp_rows: list[torch.Tensor] = []
    try:
        runner = llm.engine.runner
        if runner.spec is not None:
            from test_speculative import oracle

            runner.spec.max_verify_seqs = 1 << 10  # every batch verifies (as test_speculative)
            ref = _PLAIN.get(d)
            if ref is not None:
                runner.spec.draft_override = oracle(ref, wrong=wrong)
            inner = runner.forward_mtp

            def spy(*a, **k):
                out = inner(*a, **k)
                mtp_rows.append(None if out is None else out.clone())  # (None: its KV only)
                return out

            runner.forward_mtp = spy
        batches = [workload(), workload()[-2:]]
        toks = [o.outputs[0].token_ids for b in batches for o in llm.generate(b, GREEDY_10)]
        prompts = workload(1)[:3]
        toks += [o.outputs[0].token_ids for o in llm.generate(prompts, SEEDED)]
        if runner.spec is None:  # the plain run: the oracle's reference
            _PLAIN[d] = {tuple(p): p + t for p, t in zip(batches[0] + prompts, toks[:5] + toks[-3:],
                                                         strict=True)}  # fmt: skip
        return toks, mtp_rows, llm.engine.get_stats()
    finally:
        llm.engine.shutdown()


_PLAIN: dict = {}  # checkpoint -> {prompt: prompt + the plain engine's greedy / seeded tokens}


@pytest.mark.parametrize(
    "which,drafts,ep",
    [
        ("dense", dict(num_speculative_tokens=1), False),
        ("dense", dict(num_speculative_tokens=3), False),  # chained MTP passes
        ("moe", dict(num_speculative_tokens=2), False),
        ("moe", dict(num_speculative_tokens=2), True),
        ("dense", dict(num_speculative_tokens=2, speculative_method="ngram"), False),
    ],
)
def test_speculative_decoding_on_two_ranks(which, drafts, ep, dense_mtp, moe_mtp):
    """Drafts under tensor (and expert) parallelism: the MTP head split like the layers, every
    model call of a speculative step (hidden rows, head, MTP pass, chain) mirrored on the
    worker, rejected drafts' states put back on both ranks: the same tokens as one process
    without drafts (greedy with prefix-cache hits and preemption, seeded sampling), and the
    MTP head's rows of every pass those of one process with the same drafts."""
    d = dense_mtp if which == "dense" else moe_mtp
    plain, _, _ = spec_run(d, None, 0.0)
    one, one_rows, _ = spec_run(d, drafts, 0.3)
    two, two_rows, stats = spec_run(d, drafts, 0.3, tensor_parallel_size=2,
                                    enable_expert_parallel=ep)  # fmt: skip
    assert one == plain and two == plain
    if drafts.get("speculative_method") == "ngram":  # (random prompts: drafts, none right)
        assert stats["spec_drafts_total"] > 0
    else:
        assert 0 < stats["spec_accepted_total"] < stats["spec_drafts_total"]
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
    assert len(two_rows) == len(one_rows)
    assert (len(one_rows) > 0) == (drafts.get("speculative_method") != "ngram")
    for a, b in zip(two_rows, one_rows, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not multiprocessing.active_children()


def test_step_messages_move_the_decode_batch_and_its_phases():
    """A step's ForwardBatch reaches a worker on its device with every tensor, the DecodeBatch's
    and a verify step's phases' included (they stayed on rank 0's device before: cuda:0 tensors
    on a rank of another GPU)."""
    import dataclasses

    from qwen35.engine.forward_batch import ForwardBatch
    from qwen35.ops.backend import select_backend
    from qwen35.parallel.worker import to_device

    batch = ForwardBatch.build(positions=[4, 9], cu_seqlens=[0, 1, 2], context_lens=[5, 10],
                               slot_mapping=[4, 17], block_tables=[[0], [1, 2]],
                               state_slots=[0, 1], has_initial_state=[True, True],
                               logits_indices=[0, 1], device="cpu",
                               backend=select_backend(torch.device("cpu")),
                               input_ids=[3, 5])  # fmt: skip
    d = batch.decode
    d = dataclasses.replace(d, phases=[dataclasses.replace(d, copies_after=torch.zeros(2, 1)), d])
    moved = to_device(dataclasses.replace(batch, decode=d), torch.device("meta"))

    def tensors(obj):
        return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]

    objs = [moved, moved.decode, *moved.decode.phases]
    assert all(len(tensors(o)) >= 3 for o in objs[1:])
    assert all(t.is_meta for o in objs for t in tensors(o))
    assert moved.decode.phases[0].copies_after.is_meta


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_rank_caches_with_drafts_are_planned(method, dense_mtp):
    """Each rank's KV per token (the MTP layer's share included for MTP drafts) and DeltaNet
    state per running sequence (with its k spares) are `qwen35 plan --tp 2
    --num-speculative-tokens k`'s per-GPU figures."""
    from qwen35.cli import main

    k = 2
    llm = LLM(str(dense_mtp), tensor_parallel_size=2, dtype="bf16", verbose=False,
              num_kv_blocks=8, num_speculative_tokens=k, speculative_method=method)  # fmt: skip
    rows = llm.engine.rank_memory
    llm.engine.shutdown()

    def plan(*extra):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["plan", "-m", str(dense_mtp), "--gpu", "H100", "-n", "2", "--tp", "2",
                         "--context", "1K", "--json", *extra]) == 0  # fmt: skip
        return json.loads(buf.getvalue())["models"][0]["fits"]["bf16"]

    fit = plan("--num-speculative-tokens", str(k), "--speculative-method", method)
    assert fit["tp"] == 2 and [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["kv_bytes_per_token"] == fit["kv_bytes_per_token_per_gpu"]
        assert (1 + k) * r["state_bytes_per_sequence"] == fit["state_bytes_per_sequence_per_gpu"]
    plain = plan()["kv_bytes_per_token_per_gpu"]  # MTP drafts: one more layer's share of KV
    assert (fit["kv_bytes_per_token_per_gpu"] > plain) == (method == "mtp")


@pytest.mark.parametrize("which,ep", [("dense", False), ("moe", True)])
def test_rank_memory_equals_the_planners_per_gpu_figures(which, ep, dense, moe):
    d = dense if which == "dense" else moe
    llm = LLM(str(d), tensor_parallel_size=2, enable_expert_parallel=ep, dtype="bf16",
              verbose=False, num_kv_blocks=8, text_only=True)  # fmt: skip
    rows = llm.engine.rank_memory
    llm.engine.shutdown()
    assert_rank_memory_is_planned(rows, d, "bf16", ep)


def assert_rank_memory_is_planned(rows: list[dict], d, fmt: str, ep: bool) -> None:
    """Each rank's weights, KV per token and state per sequence (bf16 compute) are `qwen35 plan
    --tp 2`'s per-GPU figures for weight format `fmt`, within 1%."""
    from qwen35.cli import main

    buf = io.StringIO()
    args = ["plan", "-m", str(d), "--gpu", "H100", "-n", "2", "--tp", "2", "--text-only", "--context", "1K",
            "--json"] + (["--ep"] if ep else [])  # fmt: skip
    with redirect_stdout(buf):
        assert main(args) == 0
    fit = json.loads(buf.getvalue())["models"][0]["fits"][fmt]
    assert fit["tp"] == 2 and fit["ep"] == (2 if ep else 1)
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        for ours, plan in (
            ("weights_bytes", "weights_bytes_per_gpu"),
            ("kv_bytes_per_token", "kv_bytes_per_token_per_gpu"),
            ("state_bytes_per_sequence", "state_bytes_per_sequence_per_gpu"),
        ):
            assert abs(r[ours] - fit[plan]) <= 0.01 * fit[plan], (ours, r[ours], fit[plan])
