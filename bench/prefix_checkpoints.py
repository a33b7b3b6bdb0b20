"""Which DeltaNet state checkpoints the prefix cache keeps: prompt tokens computed per workload.

    python bench/prefix_checkpoints.py [--slots 1 5 10 20] [--baseline REV]

The hybrid prefix cache resumes a prompt only from a block boundary where a DeltaNet state
checkpoint survives, and a CPU engine's default budget holds few (5 for a 4B / 9B, 1 for a 27B at
2 GiB of caches: `qwen35 plan`). This drives the real scheduler (engine/scheduler.py: KV blocks,
checkpoint placement and eviction) through workloads with a stand-in model (the next token a hash
of the context: no torch, no weights) and counts the prompt tokens it computes (re-prefills after a
preemption included); fewer is better, and the counts are exact, so one run of each suffices.
With --baseline, the same workloads run from a git revision too (a temporary worktree).

Workloads (block 16, checkpoint every 256 tokens, as the engine's defaults):
  header   12 raw prompts, one after another: a shared 512-token few-shot header + a 1,536-token
           body of their own, 16 tokens out each
  chats    6 conversations x 4 turns, round-robin, each with its own 300-token system prompt, with
           the cache points LLM.chat gives (its system prompt's end and the conversation before
           the reply), and after every round two unrelated 2,048-token documents
  app      the same, all six with one system prompt (an application's)
  solo     one conversation, 8 turns, nothing else (one user at a CPU)
  rag      one 2,000-token document asked 10 questions (64 tokens each), each question followed
           by an unrelated 1,024-token prompt
  repeat   3 raw 1,000-token prompts sent 4 times each, round-robin, an unrelated 2,048-token
           prompt after each round (retries, or n > 1 as separate requests)
  preempt  8 prompts of 512 tokens each generating 512 at once in a KV pool with room for ~4:
           preempted sequences recompute from their deepest surviving checkpoint
"""

from __future__ import annotations

import argparse
import random
import sys

BLOCK = 16
VOCAB = 5000


def _token(ids: list[int]) -> int:
    return hash(tuple(ids[-64:])) % VOCAB  # (PYTHONHASHSEED-independent: ints hash to themselves)


class Model:
    """Runs what the scheduler plans; counts the prompt tokens computed (not decode steps)."""

    def __init__(self):
        self.prompt_tokens = 0

    def run(self, out) -> dict[str, int]:
        sampled = {}
        for s in out.scheduled:
            seq = s.seq
            if s.num_new_tokens > 1 or s.start < seq.num_prompt_tokens - 1:
                self.prompt_tokens += s.num_new_tokens
            if s.sample:
                sampled[seq.seq_id] = _token(seq.token_ids[: s.start + s.num_new_tokens])
        return sampled


def run(sched, model, seqs) -> list:
    for s in seqs:
        sched.add(s)
    done = []
    while sched.has_unfinished():
        out = sched.schedule()
        done += sched.update(out, model.run(out))
    return done


def make(slots: int, num_blocks: int = 4096, max_model_len: int = 8192):
    from qwen35.engine.scheduler import Scheduler, SchedulerConfig

    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                          max_model_len=max_model_len, block_size=BLOCK)  # fmt: skip
    return Scheduler(cfg, num_blocks, num_checkpoint_slots=slots), Model()


def seq(i, prompt, max_tokens=16, cache_points=()):
    from qwen35.engine.sequence import Sequence
    from qwen35.request import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if cache_points:
        params.cache_points = tuple(cache_points)
    return Sequence(f"r{i}", list(prompt), params)


def toks(rng, n):
    return [rng.randrange(VOCAB) for _ in range(n)]


def header(slots: int) -> int:
    rng = random.Random(1)
    sched, model = make(slots)
    head = toks(rng, 512)
    for i in range(12):
        run(sched, model, [seq(i, head + toks(rng, 1536))])
    return model.prompt_tokens


def chats(slots: int, shared_system: bool = False, n: int = 6, turns: int = 4, docs: int = 2) -> int:
    rng = random.Random(2)
    sched, model = make(slots)
    common = toks(rng, 300)
    convs = [(common if shared_system else toks(rng, 300), []) for _ in range(n)]
    i = 0
    for _turn in range(turns):
        for system, history in convs:  # (history: [(user, reply), ...])
            before = system + [t for u, r in history for t in u + r]
            user = toks(rng, rng.randrange(40, 200))
            prompt = before + user + toks(rng, 4)  # (+ the reply's opening)
            (out,) = run(sched, model, [seq(i, prompt, 64, (len(system), len(prompt) - 4))])
            history.append((user, out.output_token_ids))
            i += 1
        for _ in range(docs):
            run(sched, model, [seq(i, toks(rng, 2048))])
            i += 1
    return model.prompt_tokens


def app(slots: int) -> int:
    return chats(slots, shared_system=True)


def solo(slots: int) -> int:
    return chats(slots, n=1, turns=8, docs=0)


def rag(slots: int) -> int:
    rng = random.Random(3)
    sched, model = make(slots)
    doc = toks(rng, 2000)
    for i in range(10):
        run(sched, model, [seq(2 * i, doc + toks(rng, 64))])
        run(sched, model, [seq(2 * i + 1, toks(rng, 1024))])
    return model.prompt_tokens


def repeat(slots: int) -> int:
    rng = random.Random(5)
    sched, model = make(slots)
    prompts = [toks(rng, 1000) for _ in range(3)]
    for i in range(4):
        for j, p in enumerate(prompts):
            run(sched, model, [seq(3 * i + j, p)])
        run(sched, model, [seq(100 + i, toks(rng, 2048))])
    return model.prompt_tokens


def preempt(slots: int) -> int:
    rng = random.Random(4)
    sched, model = make(slots, num_blocks=4 * 1024 // BLOCK + 8, max_model_len=1024)
    run(sched, model, [seq(i, toks(rng, 512), 512) for i in range(8)])
    assert sched.num_preemptions > 0, "the preempt workload preempted nothing"
    return model.prompt_tokens


WORKLOADS = {"header": header, "chats": chats, "app": app, "solo": solo, "rag": rag,
             "repeat": repeat, "preempt": preempt}  # fmt: skip


def measure(slots: list[int]) -> list[int]:
    return [WORKLOADS[w](n) for n in slots for w in WORKLOADS]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 5, 10, 20],
                    help="checkpoint slots (the engine sizes them from --prefix-cache-memory)")  # fmt: skip
    ap.add_argument("--baseline", metavar="REV", help="also count from this git revision")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # (a baseline process)
    a = ap.parse_args(argv)
    if a.raw:
        print(" ".join(map(str, measure(a.slots))))
        return None
    runs = {"new": measure(a.slots)}
    if a.baseline:
        from qwen35.benchmarks.common import alternate_with_revision

        argv = [__file__, "--raw", "--slots", *map(str, a.slots)]
        width = len(a.slots) * len(WORKLOADS)
        runs["base"] = [int(v) for v in alternate_with_revision(a.baseline, 1, argv, width)["base"][0]]
    print(f"prompt tokens computed (fewer is better){'; base = ' + a.baseline if a.baseline else ''}")
    print(f"{'slots':>5} " + " ".join(f"{w:>24}" for w in WORKLOADS))
    for j, n in enumerate(a.slots):
        cells = []
        for k in range(len(WORKLOADS)):
            new = runs["new"][j * len(WORKLOADS) + k]
            if "base" in runs:
                base = runs["base"][j * len(WORKLOADS) + k]
                cells.append(f"{new:>8,} vs {base:>7,} {base / new:5.2f}x")
            else:
                cells.append(f"{new:>24,}")
        print(f"{n:>5} " + " ".join(cells))
    sys.stdout.flush()
    return runs


if __name__ == "__main__":
    main()
