"""The engine's host work per decode step, outside the model's forward: scheduling, the batch's
index tensors, sampling bookkeeping, detokenizing; what a CUDA graph cannot hide, and what grows
with the batch and with each sequence's length. A model of 2 tiny layers (so the forward is
small and timed apart), N sequences decoding together (their prefill untimed), timed after each
of the given numbers of generated tokens.

    python bench/host_overhead.py [--seqs 32] [--outputs 0,4000] [--steps 200]
    python bench/host_overhead.py --baseline REV --rounds 3    # against a git revision
    python bench/host_overhead.py --seqs 1 --scheduler-steps 4  # multi-step: per token

With --baseline, this checkout and the revision (a temporary git worktree) run in alternating
processes. Prints ms per step outside the forward (and the forward's, for scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def one_round(seqs: int, outputs: list[int], steps: int, k: int = 1) -> None:
    """Runs in the child: prints ms per step outside the forward after each output length
    (k > 1: multi-step decoding, k decode steps a round; then per decode step of a sequence,
    i.e. per token)."""
    import torch

    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.request import SamplingParams

    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp())
    cfg = {  # 2 layers (DeltaNet, attention), vocabulary 256: the forward costs little
        "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "vocab_size": 256,
        "max_position_embeddings": 1 << 17, "eos_token_id": 255, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                            "partial_rotary_factor": 0.25},
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    bm = load_bench_model(BenchOptions(model=str(d / "config.json"), dtype="float32"))
    eng = make_engine(bm, max_num_seqs=seqs, max_model_len=max(outputs) + steps + 256,
                      num_scheduler_steps=k)  # fmt: skip
    model, forward = eng.runner.model, [0.0, 0]

    def timed(f):
        def run(*a, **k):
            forward[1] += 1
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                forward[1] -= 1
                if forward[1] == 0:
                    forward[0] += time.perf_counter() - t

        return run

    model.forward, model.forward_hidden = timed(model.forward), timed(model.forward_hidden)
    sp = SamplingParams(max_tokens=max(outputs) + steps + 64, temperature=0.0, ignore_eos=True)
    for i in range(seqs):
        eng.add_request(f"r{i}", list(range(2, 40)), sp)
    made = [0]  # tokens of sequence r0 so far

    def step() -> int:  # one engine step; the tokens it gave each sequence
        new = sum(len(o.outputs[0].token_ids) for o in eng.step() if o.request_id == "r0")
        made[0] += new
        return new

    for _ in range(8):  # the prompts' prefill and the first decode steps are not timed
        step()
    out = []
    for n in sorted(outputs):
        while made[0] < n:
            step()
        forward[0], t, tokens = 0.0, time.perf_counter(), 0
        while tokens < steps:  # `steps` decode steps of every sequence (k a round)
            tokens += step()
        total = time.perf_counter() - t
        out += [(total - forward[0]) / tokens * 1e3, forward[0] / tokens * 1e3]
    print(" ".join(f"{v:.4f}" for v in out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--outputs", default="0,4000", help="generated tokens before each timing")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--baseline", metavar="REV", help="also time this git revision")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scheduler-steps", type=int, default=1, metavar="K",
                    help="multi-step decoding: K decode steps a round (ms are then per token)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    outputs = sorted(int(x) for x in a.outputs.split(","))
    if a.one:
        one_round(a.seqs, outputs, a.steps, a.scheduler_steps)
        return
    argv = [__file__, "--one", "--seqs", str(a.seqs), "--outputs", a.outputs,
            "--steps", str(a.steps)]  # fmt: skip
    if a.scheduler_steps != 1:
        argv += ["--scheduler-steps", str(a.scheduler_steps)]
    if a.baseline is None:
        import subprocess

        res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
        v = [float(x) for x in res.stdout.split()[-2 * len(outputs) :]]
        for i, n in enumerate(outputs):
            print(f"{a.seqs} sequences after {n} generated tokens: {v[2 * i]:.3f} ms per step "
                  f"outside the forward ({v[2 * i + 1]:.3f} ms in it)")  # fmt: skip
        return
    from qwen35.benchmarks.common import alternate_with_revision  # (the child may predate it)

    times = alternate_with_revision(a.baseline, a.rounds, argv, 2 * len(outputs))
    for i, n in enumerate(outputs):
        new = [t[2 * i] for t in times["new"]]
        old = [t[2 * i] for t in times["base"]]
        ratios = ", ".join(f"{o / v:.2f}" for v, o in zip(new, old, strict=True))
        print(f"{a.seqs} sequences after {n} generated tokens: outside the forward median "
              f"{statistics.median(new):.3f} vs {statistics.median(old):.3f} ms per step "
              f"(base / new per round: {ratios})")  # fmt: skip


if __name__ == "__main__":
    main()
