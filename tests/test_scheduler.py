"""Scheduler tests with a fake runner that simulates the caches (no torch).

FakeRunner keeps a fake KV store (flat slot -> (position, token)) and fake DeltaNet states
(slot -> rolling hash of the tokens processed), follows ScheduledSeq exactly like the real runner
must (restore_from before running, zeros when start == 0, checkpoints after n new tokens), checks
that what it reads matches the sequence's tokens, and 'samples' a token from what it read. So any
scheduling or caching mistake changes the output or trips an assertion, and every output must
equal `reference_output` (an uninterrupted run).
"""

from __future__ import annotations

import random

import pytest

from qwen35.engine import scheduler as scheduler_mod
from qwen35.engine.scheduler import Scheduler, SchedulerConfig
from qwen35.engine.sequence import Sequence, SequenceStatus
from qwen35.request import SamplingParams

VOCAB = 50
MOD = (1 << 61) - 1


def roll(h: int, tok: int) -> int:
    return (h * 1_000_003 + tok + 1) % MOD


def ref_hash(tokens) -> int:
    h = 0
    for t in tokens:
        h = roll(h, t)
    return h


class FakeRunner:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.bs = sched.config.block_size
        self.kv: dict[int, tuple[int, int]] = {}
        self.state: list[int | None] = [None] * sched.state.total_slots
        self.restores = 0
        self.log: list[tuple] = []  # (seq_id, start, num_new_tokens, restore_from, checkpoints)

    def run(self, out) -> dict[str, int]:
        num_slots, pool = self.sched.state.num_slots, self.sched.kv
        for s in out.scheduled:  # restores first: a checkpoint written this step is not one
            if s.restore_from is not None:
                assert s.start > 0 and num_slots <= s.restore_from < self.sched.state.total_slots
                self.state[s.seq.state_slot] = self.state[s.restore_from]
                self.restores += 1
        sampled = {}
        for s in out.scheduled:
            seq, bs = s.seq, self.bs
            self.log.append((seq.seq_id, s.start, s.num_new_tokens, s.restore_from, s.checkpoints))
            assert 0 <= seq.state_slot < num_slots and s.num_new_tokens >= 1
            st = self.state[seq.state_slot] if s.has_initial_state else 0
            assert st == ref_hash(seq.token_ids[: s.start]), f"{seq.seq_id}: wrong state"
            ckpts = dict(s.checkpoints)
            for j in range(s.num_new_tokens):
                p = s.start + j
                b = seq.block_ids[p // bs]
                assert pool.ref_counts[b] == 1 and pool.block_hash[b] is None, "write to shared"
                self.kv[b * bs + p % bs] = (p, seq.token_ids[p])
                st = roll(st, seq.token_ids[p])
                if j + 1 in ckpts:
                    assert (p + 1) % bs == 0, "checkpoint off a block boundary"
                    self.state[ckpts[j + 1]] = st
            self.state[seq.state_slot] = st
            if s.sample:
                # 'attention': read the whole context through the block table
                end = s.start + s.num_new_tokens
                read = [self.kv[seq.block_ids[p // bs] * bs + p % bs] for p in range(end)]
                assert read == list(enumerate(seq.token_ids[:end])), f"{seq.seq_id}: wrong KV"
                sampled[seq.seq_id] = (st ^ (st >> 7)) % VOCAB
        return sampled


def reference_output(prompt, params: SamplingParams, cfg: SchedulerConfig) -> list[int]:
    """What an uninterrupted run generates (same stop rules as the scheduler)."""
    toks, out = list(prompt), []
    while True:
        h = ref_hash(toks)
        tok = (h ^ (h >> 7)) % VOCAB
        toks.append(tok)
        out.append(tok)
        if len(out) >= params.min_tokens and (
            (not params.ignore_eos and tok in cfg.eos_token_ids) or tok in params.stop_token_ids
        ):
            return out
        if (params.max_tokens and len(out) >= params.max_tokens) or len(toks) >= cfg.max_model_len:
            return out


def run_steps(sched, runner, arrivals=(), abort_prob=0.0, rng=None, max_steps=20_000, cap=0,
              short_first=False):  # fmt: skip
    """Drive the scheduler to completion, checking invariants after every step.
    arrivals: list of (step, Sequence); cap, short_first: every step's schedule() arguments.
    Returns (finished sequences, aborted ids, steps)."""
    cfg = sched.config
    pending = sorted(arrivals, key=lambda a: a[0])
    done, aborted, step = [], set(), 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        if rng and abort_prob and rng.random() < abort_prob and sched._seqs:
            victim = rng.choice(sorted(sched._seqs))
            assert sched.abort(victim)
            aborted.add(victim)
            sched.check_integrity()
        decoding = any(s.num_tokens - s.num_computed_tokens == 1 for s in sched.running)
        out = sched.schedule(cap, short_first)
        sched.check_integrity()
        if cap and decoding:
            assert out.num_prefill_tokens <= cap
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        if cfg.max_chunk_tokens:
            assert all(s.num_new_tokens <= cfg.max_chunk_tokens for s in out.scheduled)
        done += sched.update(out, runner.run(out))
        sched.check_integrity()
        assert sched.state.num_pending == 0
        step += 1
        assert step < max_steps, "no progress"
    return done, aborted, step


def assert_all_released(sched):
    assert sched.kv.num_used_blocks == 0
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.state.num_free_slots == sched.state.num_slots
    assert not sched.running and not sched.waiting


def make_seq(i, prompt, **params):
    return Sequence(f"s{i}", list(prompt), SamplingParams(**params))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of block_size"):
        SchedulerConfig(block_size=16, checkpoint_interval=40)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    assert SchedulerConfig(block_size=16).checkpoint_interval == 256
    assert SchedulerConfig(block_size=528).checkpoint_interval == 528
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Scheduler(SchedulerConfig(max_model_len=100, block_size=16), num_blocks=6)


def test_add_validation():
    sched = Scheduler(SchedulerConfig(max_model_len=64, block_size=4), num_blocks=32)
    with pytest.raises(ValueError, match="1 to max_model_len"):
        sched.add(make_seq(0, range(65)))
    with pytest.raises(ValueError, match="1 to max_model_len"):
        sched.add(make_seq(0, []))
    sched.add(make_seq(0, [1, 2]))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(make_seq(0, [3]))


def test_single_sequence_prefill_then_decode():
    cfg = SchedulerConfig(max_num_batched_tokens=64, block_size=4, max_model_len=128)
    sched = Scheduler(cfg, num_blocks=64)
    runner = FakeRunner(sched)
    seq = make_seq(0, range(10), max_tokens=5)
    sched.add(seq)
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_new_tokens, s.sample, s.restore_from) == (0, 10, True, None)
    assert len(seq.block_ids) == 3 and seq.state_slot == 0
    sched.update(out, runner.run(out))
    out = sched.schedule()
    assert [(s.start, s.num_new_tokens, s.sample) for s in out.scheduled] == [(10, 1, True)]
    sched.update(out, runner.run(out))
    done, _, _ = run_steps(sched, runner)
    assert done == [seq] and seq.finish_reason == "length"
    assert seq.output_token_ids == reference_output(range(10), seq.params, cfg)
    assert seq.num_output_tokens == 5 and seq.num_tokens == 15
    assert_all_released(sched)


def test_chunked_prefill_mixes_with_decodes():
    cfg = SchedulerConfig(max_num_batched_tokens=16, block_size=4, max_model_len=256)
    sched = Scheduler(cfg, num_blocks=128)
    runner = FakeRunner(sched)
    short = make_seq(0, range(5), max_tokens=20)
    sched.add(short)
    out = sched.schedule()
    sched.update(out, runner.run(out))
    long = make_seq(1, range(100, 160), max_tokens=3)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = sched.schedule()
        by_id = {s.seq.seq_id: s for s in out.scheduled}
        assert by_id["s0"].num_new_tokens == 1  # the decode runs every step
        chunks.append((by_id["s1"].start, by_id["s1"].num_new_tokens, by_id["s1"].sample))
        assert out.num_batched_tokens == 16
        sched.update(out, runner.run(out))
        sched.check_integrity()
    # 60 prompt tokens in chunks of 15 (budget 16 - 1 decode); only the last one samples
    assert chunks == [(0, 15, False), (15, 15, False), (30, 15, False), (45, 15, True)]
    done, _, _ = run_steps(sched, runner)
    for seq in (short, long):
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params, cfg)
    assert_all_released(sched)


def test_max_chunk_tokens_lets_prefills_share_a_step():
    cfg = SchedulerConfig(
        max_num_batched_tokens=32, block_size=4, max_chunk_tokens=8, max_model_len=64
    )
    sched = Scheduler(cfg, num_blocks=64, num_checkpoint_slots=0)
    for i in range(3):
        sched.add(make_seq(i, range(i, i + 40), max_tokens=2))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [8, 8, 8]


def test_decode_prefill_cap_paces_prompts_only_while_sequences_decode():
    cfg = SchedulerConfig(max_num_batched_tokens=2048, block_size=16, max_model_len=4096)
    sched = Scheduler(cfg, num_blocks=1024)
    runner = FakeRunner(sched)
    a = make_seq(0, range(2, 12), max_tokens=100)
    sched.add(a)
    out = sched.schedule(128)  # nothing decodes yet: no cap
    assert [s.num_new_tokens for s in out.scheduled] == [10]
    sched.update(out, runner.run(out))
    b, c = make_seq(1, [5] * 1000), make_seq(2, [6] * 300)
    sched.add(b)
    sched.add(c)
    chunks = []
    while b.num_computed_tokens < 1000:
        out = sched.schedule(100)  # a decodes: 100 prompt tokens a step, cut on the 64 grid
        rows = {s.seq.seq_id: s for s in out.scheduled}
        assert rows["s0"].num_new_tokens == 1 and rows["s0"].is_decode  # a every step
        assert "s2" not in rows  # c waits: b took the step's prompt tokens
        chunks.append((rows["s1"].start, rows["s1"].num_new_tokens))
        assert out.num_prefill_tokens == chunks[-1][1]
        sched.update(out, runner.run(out))
    assert all(n == 64 for _, n in chunks[:-1]) and chunks[-1] == (960, 40)
    assert all((start + n) % 64 == 0 for start, n in chunks[:-1])
    sched.abort("s0")
    sched.abort("s1")
    out = sched.schedule(100)  # nothing decodes: c takes its whole prompt
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("s2", 300)]
    sched.update(out, runner.run(out))
    d = make_seq(3, [7] * 300)
    sched.add(d)
    out = sched.schedule(0)  # c decodes, but 0 is no cap
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("s2", 1), ("s3", 300)]
    sched.update(out, runner.run(out))
    assert c.output_token_ids == reference_output(c.prompt_token_ids, c.params, cfg)[:2]


@pytest.mark.parametrize("cap", [0, 576])
def test_short_prompts_start_beside_a_long_prompts_chunk(cap):
    cfg = SchedulerConfig(max_num_batched_tokens=2048, block_size=16, max_model_len=8192)
    sched = Scheduler(cfg, num_blocks=2048, num_slots=4 if cap else 3)
    runner = FakeRunner(sched)
    streams = []
    if cap:  # a sequence decoding: the step's prompt tokens are capped
        streams.append(make_seq(9, range(2, 12), max_tokens=200))
        sched.add(streams[0])
        out = sched.schedule(cap, short_first=True)
        sched.update(out, runner.run(out))
    allowance = cap or 2048
    long = make_seq(0, [5] * 5000, max_tokens=2)
    sched.add(long)
    out = sched.schedule(cap, short_first=True)
    sched.update(out, runner.run(out))
    assert long.num_computed_tokens == allowance  # alone: the whole allowance
    a, b, c = make_seq(1, [6] * 100, max_tokens=2), make_seq(2, [7] * 60, max_tokens=2), \
        make_seq(3, [8] * 30, max_tokens=2)  # fmt: skip
    for seq in (a, b, c):
        sched.add(seq)
    out = sched.schedule(cap, short_first=True)
    rows = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled if not s.is_decode}
    # a and b fit beside a grid step of the long prompt; c finds no free state slot: it waits
    end = (allowance + allowance - 160) // 64 * 64
    assert rows == {"s0": end - allowance, "s1": 100, "s2": 60}
    assert out.num_prefill_tokens <= allowance
    sched.update(out, runner.run(out))
    assert a.num_output_tokens == b.num_output_tokens == 1  # both sampled their first token
    long_prompt = make_seq(4, [9] * 3000, max_tokens=2)
    sched.add(long_prompt)  # behind c; a long prompt is not reserved for: FCFS as before
    without = Scheduler(cfg, num_blocks=2048, num_slots=3)
    for seq in (make_seq(0, [5] * 5000), make_seq(1, [6] * 100)):
        without.add(seq)
    out = without.schedule(cap)  # short_first off: the long prompt's chunk takes the step
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("s0", 2048)]
    done, _, _ = run_steps(sched, runner, short_first=True, cap=cap)
    for seq in done:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params, cfg)
    assert {s.seq_id for s in done} >= {"s0", "s1", "s2", "s3", "s4"}


def _long_prefilling(num_slots, num_blocks, cap=576, policy="fcfs"):
    """A stream decoding and a 5,000-token prompt mid-prefill (capped at `cap` a step)."""
    cfg = SchedulerConfig(max_num_batched_tokens=2048, block_size=16, max_model_len=6144,
                          scheduling_policy=policy)  # fmt: skip
    sched = Scheduler(cfg, num_blocks=num_blocks, num_slots=num_slots)
    runner = FakeRunner(sched)
    for seq in (make_seq(9, range(2, 12), max_tokens=400), make_seq(0, [5] * 5000, max_tokens=2)):
        sched.add(seq)
        out = sched.schedule(cap, short_first=True)
        sched.update(out, runner.run(out))
    return cfg, sched, runner


@pytest.mark.parametrize("cap", [576, 100_000])
def test_a_short_prompt_passes_a_waiting_long_one(cap):
    """Behind a waiting prompt that does not fit beside the running one's chunk, a short prompt
    starts at once; the passed prompt still gets its first token when it would have."""
    starts = {}
    for with_short in (False, True):
        cfg, sched, runner = _long_prefilling(num_slots=4, num_blocks=2048, cap=cap)
        second = make_seq(1, [6] * 3000, max_tokens=2)
        short = make_seq(2, [7] * 100, max_tokens=2)
        for seq in (second, short) if with_short else (second,):
            sched.add(seq)
        out = sched.schedule(cap, short_first=True)
        rows = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
        assert rows.get("s1", 0) < 64  # at most the leftover of the running chunk's grid cut
        if with_short:
            assert rows["s2"] == 100 and out.num_prefill_tokens <= min(cap, 2048)
        sched.update(out, runner.run(out))
        step = 1
        while second.num_output_tokens == 0:
            out = sched.schedule(cap, short_first=True)
            sched.update(out, runner.run(out))
            step += 1
        starts[with_short] = step
        done, _, _ = run_steps(sched, runner, cap=cap, short_first=True)
        for seq in done:
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params, cfg)
    # the short prompt's 100 tokens came out of the prompts' chunks: a step later at most
    assert starts[False] <= starts[True] <= starts[False] + 1, starts


def test_a_short_prompt_too_long_for_the_room_goes_on_in_shares():
    """At the 128-token floor (a larger model on a CPU) the room beside a long prompt's grid
    step is 64 tokens: a 200-token chat turn starts there and goes on ahead of the long prompt
    in the next steps, the long one keeping 64 a step; a later 20-token turn goes first."""
    cfg, sched, runner = _long_prefilling(num_slots=6, num_blocks=2048, cap=128)
    long = sched.running[1]
    chat = make_seq(1, [6] * 200, max_tokens=2)
    sched.add(chat)
    rows = []
    for step in range(5):
        if step == 2:
            sched.add(make_seq(2, [7] * 20, max_tokens=2))
        before = long.num_computed_tokens
        out = sched.schedule(128, short_first=True)
        got = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled if not s.is_decode}
        sched.update(out, runner.run(out))
        assert long.num_computed_tokens - before == 64 and out.num_prefill_tokens <= 128
        rows.append((got.get("s1", 0), got.get("s2", 0)))
    # the chat turn 64 a step; the later 20-token turn whole, before the chat turn's share
    # (the 44 tokens left of the room are not a grid step: none for the chat turn there)
    assert rows == [(64, 0), (64, 0), (0, 20), (64, 0), (8, 0)]
    assert chat.num_output_tokens == 1
    done, _, _ = run_steps(sched, runner, cap=128, short_first=True)
    for seq in done:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params, cfg)


def test_a_short_prompt_does_not_take_a_passed_prompts_seat():
    _, sched, _ = _long_prefilling(num_slots=3, num_blocks=2048)
    sched.add(make_seq(1, [6] * 3000))
    sched.add(make_seq(2, [7] * 100))  # one free slot: the long prompt's, when it can start
    out = sched.schedule(576, short_first=True)
    assert {s.seq.seq_id for s in out.scheduled} == {"s9", "s0"}
    sched.add(make_seq(3, [8] * 50))
    assert sched._short_picks(576 - 64) == []


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_short_prompt_passes_only_as_urgent_prompts_under_priority(policy):
    _, sched, _ = _long_prefilling(num_slots=6, num_blocks=2048, policy=policy)
    sched.add(make_seq(1, [6] * 3000, priority=0))
    sched.add(make_seq(2, [7] * 100, priority=1))  # less urgent than the prompt it would pass
    sched.add(make_seq(3, [8] * 50, priority=0))
    picks = [s.seq_id for s in sched._short_picks(576 - 64)]
    # priority: the queue is (priority, arrival): s3 passes s1, s2 (less urgent) does not
    assert picks == (["s2", "s3"] if policy == "fcfs" else ["s3"])


def test_a_short_prompt_does_not_take_a_passed_prompts_memory():
    # 509 blocks of 16 tokens: the running prompt's 5,000 (313), the stream's (1) and the
    # passed one's 3,000 (188) leave 7 blocks: a 100-token prompt (7 blocks) may pass, a
    # 120-token one (8) may not
    for n, fits in ((100, True), (120, False)):
        _, sched, _ = _long_prefilling(num_slots=4, num_blocks=509)
        sched.add(make_seq(1, [6] * 3000))
        sched.add(make_seq(2, [7] * n))
        running = sum(-(-s.num_tokens // 16) - len(s.block_ids) for s in sched.running)
        assert sched.kv.num_free_blocks - running - 188 == 7
        assert [s.seq_id for s in sched._short_picks(576 - 64)] == (["s2"] if fits else [])


@pytest.mark.parametrize("threshold, starts", [(1024, True), (600, True), (599, False), (0, False)])
def test_short_prompt_tokens_draws_the_line(threshold, starts):
    """--short-prompt-tokens (vLLM's --long-prefill-token-threshold): a 600-token prompt that
    does not fit beside a long prompt's paced chunk starts in shares ahead of it only when it is
    short by that line."""
    cfg = SchedulerConfig(max_num_batched_tokens=2048, block_size=16, max_model_len=6144,
                          short_prompt_tokens=threshold)  # fmt: skip
    sched = Scheduler(cfg, num_blocks=2048, num_slots=4)
    runner = FakeRunner(sched)
    for seq in (make_seq(9, range(2, 12), max_tokens=400), make_seq(0, [5] * 5000, max_tokens=2)):
        sched.add(seq)
        out = sched.schedule(192, short_first=True)
        sched.update(out, runner.run(out))
    sched.add(make_seq(1, [6] * 600, max_tokens=2))
    out = sched.schedule(192, short_first=True)
    rows = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled if not s.is_decode}
    assert ("s1" in rows) == starts, rows
    with pytest.raises(ValueError, match="short_prompt_tokens"):
        SchedulerConfig(short_prompt_tokens=-1)


def run_mixed_workload(seed: int) -> int:
    """Documents and chat turns mixed, memory and seats tight, prompt chunks paced and short
    prompts first: every request completes with the reference tokens. -> the steps in which a
    short prompt passed a waiting one."""
    rng = random.Random(seed)
    policy = "priority" if seed % 3 == 2 else "fcfs"  # a third under the priority policy
    cfg = SchedulerConfig(max_num_seqs=rng.randint(2, 6), max_num_batched_tokens=64,
                          max_model_len=400, block_size=8, eos_token_ids=(0,),
                          enable_prefix_caching=rng.random() < 0.5,
                          scheduling_policy=policy, short_prompt_tokens=100)  # fmt: skip
    sched = Scheduler(cfg, num_blocks=50 + rng.randint(0, 100), num_slots=rng.randint(2, 6),
                      num_checkpoint_slots=4)  # fmt: skip
    arrivals = []
    for i in range(24):
        n = rng.randint(150, 390) if rng.random() < 0.3 else rng.randint(1, 20)
        prompt = [rng.randrange(1, VOCAB) for _ in range(n)]
        arrivals.append((rng.randint(0, 60), make_seq(i, prompt, max_tokens=rng.randint(1, 9),
                                                      priority=rng.choice([0, 0, 1]))))  # fmt: skip
    passing, real = [], sched._short_picks

    def watch(room):
        picks = real(room)
        passing.append(any(s is not w for s, w in zip(picks, sched.waiting, strict=False)))
        return picks

    sched._short_picks = watch
    with pytest.MonkeyPatch.context() as mp:  # the workload's scale: chat turns, documents
        mp.setattr(scheduler_mod, "PREFILL_GRID", 8)
        done, _, _ = run_steps(sched, FakeRunner(sched), arrivals, cap=32, short_first=True)
    assert {s.seq_id for s in done} == {s.seq_id for _, s in arrivals}
    for s in done:
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params, cfg)
    assert_all_released(sched)
    return sum(passing)


@pytest.mark.parametrize("seed", range(12))
def test_short_prompts_passing_long_ones_in_random_workloads(seed):
    run_mixed_workload(seed)


def test_random_mixed_workloads_do_pass():
    """The workloads above are not vacuous: short prompts do pass waiting long ones."""
    assert sum(run_mixed_workload(seed) > 0 for seed in range(12)) >= 6


def test_a_cap_above_the_budget_reserves_within_the_budget():
    """On a GPU the pacer's cap exceeds the step's budget: the budget is the allowance."""
    cfg = SchedulerConfig(max_num_batched_tokens=256, block_size=16, max_model_len=4096)
    sched = Scheduler(cfg, num_blocks=1024)
    runner = FakeRunner(sched)
    for seq in (make_seq(0, range(2, 12), max_tokens=50), make_seq(1, [5] * 2000)):
        sched.add(seq)
    for _ in range(2):  # s0 prefilled and decoding, s1 mid-prefill
        out = sched.schedule(10_000, short_first=True)
        sched.update(out, runner.run(out))
    sched.add(make_seq(2, [6] * 100))
    out = sched.schedule(10_000, short_first=True)
    rows = {s.seq.seq_id: (s.start, s.num_new_tokens) for s in out.scheduled}
    assert rows["s0"][1] == 1 and rows["s2"] == (0, 100)
    start, n = rows["s1"]  # at most 256 - 100, ending on the 64-token grid
    assert n <= 156 and (start + n) % 64 == 0 and n > 156 - 64
    assert out.num_batched_tokens <= 256


def test_max_num_seqs_and_state_slots_cap_concurrency():
    cfg = SchedulerConfig(
        max_num_seqs=3, max_num_batched_tokens=1000, block_size=4, max_model_len=64
    )
    sched = Scheduler(cfg, num_blocks=256, num_slots=2)
    for i in range(5):
        sched.add(make_seq(i, range(i, i + 6), max_tokens=4))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and sched.num_running == 2 and sched.num_waiting == 3
    sched2 = Scheduler(cfg, num_blocks=256)
    for i in range(5):
        sched2.add(make_seq(i, range(i, i + 6), max_tokens=4))
    assert len(sched2.schedule().scheduled) == 3


def test_token_budget_limits_decodes():
    cfg = SchedulerConfig(max_num_batched_tokens=3, block_size=4, max_model_len=64)
    sched = Scheduler(cfg, num_blocks=256)
    runner = FakeRunner(sched)
    for i in range(5):
        sched.add(make_seq(i, [i], max_tokens=3))
    first = sched.schedule()
    assert [s.seq.seq_id for s in first.scheduled] == ["s0", "s1", "s2"]
    sched.update(first, runner.run(first))
    done, _, _ = run_steps(sched, runner)
    assert len(done) == 5


def test_preemption_recomputes_and_matches_reference():
    # 12 blocks of 4 tokens: three sequences growing to 30 tokens cannot all fit.
    cfg = SchedulerConfig(max_num_batched_tokens=64, block_size=4, max_model_len=40)
    sched = Scheduler(cfg, num_blocks=12, num_checkpoint_slots=0)
    runner = FakeRunner(sched)
    seqs = [make_seq(i, range(10 * i, 10 * i + 10), max_tokens=20) for i in range(3)]
    preempted = []
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        out = sched.schedule()
        for p in out.preempted:
            assert p.status is SequenceStatus.WAITING and sched.waiting[0] is out.preempted[-1]
            assert p.num_computed_tokens == 0 and not p.block_ids and p.state_slot is None
        preempted += [p.seq_id for p in out.preempted]
        sched.update(out, runner.run(out))
        sched.check_integrity()
    assert preempted and preempted[0] == "s2"  # the most recently admitted goes first
    assert sched.num_preemptions == len(preempted)
    for s in seqs:
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params, cfg)
    assert_all_released(sched)


def test_abort_frees_waiting_and_running():
    cfg = SchedulerConfig(max_num_batched_tokens=8, block_size=4, max_num_seqs=1, max_model_len=64)
    sched = Scheduler(cfg, num_blocks=64)
    runner = FakeRunner(sched)
    a, b = make_seq(0, range(20)), make_seq(1, range(5))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.update(out, runner.run(out))
    assert a.status is SequenceStatus.RUNNING and a.block_ids
    assert sched.abort("s0") and sched.abort("s1") and not sched.abort("s1")
    assert a.finish_reason == b.finish_reason == "abort"
    assert a.status is SequenceStatus.FINISHED_ABORTED and not a.block_ids and a.state_slot is None
    sched.check_integrity()
    assert_all_released(sched)
    assert not sched.has_unfinished() and sched.schedule().is_empty


def test_abort_between_schedule_and_update_is_ignored():
    cfg = SchedulerConfig(
        max_num_batched_tokens=64, block_size=4, checkpoint_interval=8, max_model_len=64
    )
    sched = Scheduler(cfg, num_blocks=64, num_checkpoint_slots=4)
    runner = FakeRunner(sched)
    sched.add(make_seq(0, range(30)))
    out = sched.schedule()
    assert out.scheduled[0].checkpoints
    sampled = runner.run(out)
    sched.abort("s0")
    assert sched.update(out, sampled) == []
    sched.check_integrity()
    assert sched.state.num_pending == 0 and sched.state.num_checkpoints == 0
    assert_all_released(sched)


@pytest.mark.parametrize(
    "params, eos, expect",
    [
        (dict(max_tokens=3), (), ("length", None, 3)),
        (dict(max_tokens=50, stop_token_ids=[None]), (), ("stop", "tok", 2)),
        (dict(max_tokens=50), ("tok",), ("stop", None, 2)),
        (dict(max_tokens=50, ignore_eos=True), ("tok",), ("length", None, 50)),
        (dict(max_tokens=50, min_tokens=3), ("tok",), (None, None, None)),
        (dict(max_tokens=None), (), ("length", None, 64 - 4)),
    ],
)
def test_stop_conditions(params, eos, expect):
    base = SchedulerConfig(max_model_len=64, block_size=4)
    prompt = [1, 2, 3, 4]
    tok2 = reference_output(prompt, SamplingParams(max_tokens=2), base)[1]  # 2nd generated token
    params = {k: ([tok2] if v == [None] else v) for k, v in params.items()}
    cfg = SchedulerConfig(max_model_len=64, block_size=4, eos_token_ids=[tok2 for _ in eos])
    sched = Scheduler(cfg, num_blocks=32)
    seq = make_seq(0, prompt, **params)
    sched.add(seq)
    (done,), _, _ = run_steps(sched, FakeRunner(sched))
    assert done is seq
    expected = reference_output(prompt, seq.params, cfg)
    assert seq.output_token_ids == expected
    if expect[0] is not None:
        reason, stop_reason, n = expect
        assert seq.finish_reason == reason and seq.num_output_tokens == n
        assert seq.stop_reason == (tok2 if stop_reason == "tok" else None)
    else:  # min_tokens suppresses the eos at position 2; it stops at a later eos or the limit
        assert seq.num_output_tokens >= 3
    assert_all_released(sched)


def test_finish_for_stop_strings():
    cfg = SchedulerConfig(block_size=4, max_model_len=64)
    sched = Scheduler(cfg, num_blocks=64)
    runner = FakeRunner(sched)
    seq = make_seq(0, range(6), max_tokens=10)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, runner.run(out))
    assert sched.finish("s0", "stop", stop_reason="</s>")
    assert seq.finish_reason == "stop" and seq.stop_reason == "</s>"
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish("s1", "bogus")
    assert_all_released(sched)


def test_update_needs_sampled_token():
    sched = Scheduler(SchedulerConfig(block_size=4, max_model_len=64), num_blocks=64)
    sched.add(make_seq(0, range(3)))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.update(out, {})


def random_workload(seed: int, prefix_caching: bool, policy: str = "fcfs"):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    max_len = 80
    cfg = SchedulerConfig(
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(1, 64),
        max_model_len=max_len,
        block_size=bs,
        enable_prefix_caching=prefix_caching,
        checkpoint_interval=bs * rng.randint(1, 4),
        checkpoint_prompt_end=rng.random() < 0.5,
        max_chunk_tokens=rng.choice([0, 0, 7]),
        eos_token_ids=(0,),
        scheduling_policy=policy,
    )
    num_blocks = -(-max_len // bs) + rng.randint(0, 24 // bs)  # tight: forces preemption
    ckpts = rng.choice([1, 4, 16])
    sched = Scheduler(cfg, num_blocks, num_slots=rng.randint(1, 8), num_checkpoint_slots=ckpts)
    shared = [rng.randrange(1, VOCAB) for _ in range(40)]
    arrivals = []
    for i in range(rng.randint(5, 14)):
        prompt = shared[: rng.randint(0, 40)] + [rng.randrange(VOCAB) for _ in range(5)]
        prompt = prompt[: rng.randint(1, len(prompt))]
        params = SamplingParams(max_tokens=rng.randint(1, 40), min_tokens=rng.choice([0, 2]),
                                priority=rng.choice([0, -3, 2]) if policy == "priority" else 0)
        arrivals.append((rng.randint(0, 30), make_seq(i, prompt, **vars(params))))
    return rng, cfg, sched, arrivals


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_randomized_workloads(seed, prefix_caching, monkeypatch):
    policy = "priority" if seed % 4 == 3 else "fcfs"  # a quarter under the priority policy
    rng, cfg, sched, arrivals = random_workload(seed, prefix_caching, policy)
    runner = FakeRunner(sched)
    pace = random.Random(seed + 1000)  # prompt chunks paced or not, short prompts first or not
    cap, short_first = pace.choice([0, 0, 1, 5, 70]), pace.random() < 0.5
    # a grid of this workload's scale (prompts of up to 45 tokens), so that cuts and
    # reservations happen (test_short_first_reserves_in_random_workloads counts them)
    monkeypatch.setattr(scheduler_mod, "PREFILL_GRID", pace.choice([2, 4, 8, 64]))
    done, aborted, _ = run_steps(sched, runner, arrivals, abort_prob=0.03, rng=rng, cap=cap,
                                 short_first=short_first)  # fmt: skip
    assert {s.seq_id for s in done} | aborted == {s.seq_id for _, s in arrivals}
    for s in done:
        ref = reference_output(s.prompt_token_ids, s.params, cfg)
        assert s.output_token_ids == ref, s.seq_id
    assert_all_released(sched)


def test_short_first_reserves_in_random_workloads(monkeypatch):
    """The random workloads above do start short prompts beside long ones (at their small
    grids)."""
    real, reserved = scheduler_mod.Scheduler._short_grants, []

    def counting(self, allowance, grants):
        picks = real(self, allowance, grants)
        reserved.append(sum(grants[s.seq_id] for s in picks))
        return picks

    monkeypatch.setattr(scheduler_mod.Scheduler, "_short_grants", counting)
    monkeypatch.setattr(scheduler_mod, "PREFILL_GRID", 4)
    for seed in range(12):
        rng, _, sched, arrivals = random_workload(seed, True)
        run_steps(sched, FakeRunner(sched), arrivals, abort_prob=0.03, rng=rng, cap=70,
                  short_first=True)  # fmt: skip
    assert sum(r > 0 for r in reserved) >= 15, reserved


def test_randomized_workloads_exercise_every_path():
    """The random workloads above are not vacuous: together they preempt, hit and evict."""
    totals = dict(preemptions=0, restores=0, block_evictions=0, ckpt_evictions=0, aborts=0)
    for seed in range(16):
        rng, _, sched, arrivals = random_workload(seed, True)
        runner = FakeRunner(sched)
        _, aborted, _ = run_steps(sched, runner, arrivals, abort_prob=0.03, rng=rng)
        st = sched.prefix_cache_stats()
        totals["preemptions"] += sched.num_preemptions
        totals["restores"] += runner.restores
        totals["block_evictions"] += st.block_evictions
        totals["ckpt_evictions"] += st.checkpoint_evictions
        totals["aborts"] += len(aborted)
    assert all(v >= 5 for v in totals.values()), totals


def test_scheduler_and_pools_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, qwen35.engine.scheduler, qwen35.engine.kv_cache, qwen35.engine.state_cache, qwen35.engine.sequence;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lookahead_blocks_budget_and_bonus_tokens():
    """Speculative decoding's seams: a decode step gets a block and budget for its draft
    position (capped by max_model_len), prefills get none; a bonus token counts the draft as
    computed, registers the block it fills and is dropped when the sampled token finished the
    sequence."""
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=12,
                          block_size=4, num_lookahead_tokens=1)  # fmt: skip
    sched = Scheduler(cfg, num_blocks=16)
    seq = make_seq(0, [5, 6, 7], max_tokens=8, ignore_eos=True)
    sched.add(seq)
    out = sched.schedule()
    assert out.scheduled[0].lookahead == 0 and out.num_batched_tokens == 3  # a prefill
    sched.update(out, {"s0": 8})  # 4 tokens, 3 computed
    out = sched.schedule()
    s = out.scheduled[0]
    assert (s.start, s.num_new_tokens, s.lookahead) == (3, 1, 1)
    assert out.num_batched_tokens == 2 and len(seq.block_ids) == 2  # position 4: a 2nd block
    sched.update(out, {"s0": 9}, {"s0": [10]})  # the draft (== 9) accepted, bonus 10
    assert out.bonus_applied == {"s0": 1} and seq.token_ids[3:] == [8, 9, 10]
    assert seq.num_computed_tokens == 5
    assert sched.kv.block_hash[seq.block_ids[0]]  # the first full block is registered
    out = sched.schedule()
    sched.update(out, {"s0": 11})  # rejected: no bonus
    assert out.bonus_applied == {} and seq.num_computed_tokens == 6
    sched.check_integrity()
    # max_model_len 12: the lookahead never reaches past it
    while sched.has_unfinished():
        out = sched.schedule()
        s = out.scheduled[0]
        assert s.start + 1 + s.lookahead <= cfg.max_model_len
        sched.update(out, {"s0": 1}, {"s0": [2]})
        if sched.has_unfinished():
            sched.check_integrity()
    assert seq.num_output_tokens == 8 and seq.finish_reason == "length"
    # the sampled token ends it (stop id): the bonus is not appended
    seq = make_seq(1, [5, 6, 7], max_tokens=8, stop_token_ids=[3])
    sched.add(seq)
    sched.update(sched.schedule(), {"s1": 8})
    out = sched.schedule()
    sched.update(out, {"s1": 3}, {"s1": [4]})
    assert seq.token_ids[-1] == 3 and out.bonus_applied == {} and seq.is_finished
    assert_all_released(sched)


def test_lookahead_of_several_drafts():
    """num_lookahead_tokens 3: blocks and budget for three draft positions (fewer near
    max_model_len or the budget); bonus tokens count their drafts as computed, register the
    blocks they fill and stop at the first that finishes the sequence; more bonus tokens than
    draft positions are refused."""
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=14,
                          block_size=4, num_lookahead_tokens=3)  # fmt: skip
    sched = Scheduler(cfg, num_blocks=16)
    seq = make_seq(0, [5, 6, 7], max_tokens=10, ignore_eos=True, stop_token_ids=[99])
    sched.add(seq)
    sched.update(sched.schedule(), {"s0": 8})  # prefill: 4 tokens, 3 computed
    out = sched.schedule()
    s = out.scheduled[0]
    assert (s.start, s.num_new_tokens, s.lookahead) == (3, 1, 3)
    assert out.num_batched_tokens == 4 and len(seq.block_ids) == 2  # positions 3..6
    sched.update(out, {"s0": 9}, {"s0": [10, 11, 12]})  # drafts 9, 10, 11 accepted
    assert out.bonus_applied == {"s0": 3} and seq.token_ids[3:] == [8, 9, 10, 11, 12]
    assert seq.num_computed_tokens == 7
    assert sched.kv.block_hash[seq.block_ids[0]] and not sched.kv.block_hash[seq.block_ids[1]]
    out = sched.schedule()
    assert out.scheduled[0].lookahead == 3
    sched.update(out, {"s0": 13}, {"s0": [14]})  # position 7 (draft 13) fills the second block
    assert sched.kv.block_hash[seq.block_ids[1]] and seq.num_computed_tokens == 9
    out = sched.schedule()
    with pytest.raises(ValueError, match="more bonus tokens"):
        sched.update(out, {"s0": 13}, {"s0": [1, 2, 3, 4]})
    sched.update(out, {"s0": 13}, {})  # (nothing was applied: the step again, no drafts)
    seq2 = make_seq(1, [5, 6, 7], max_tokens=10, ignore_eos=True, stop_token_ids=[99])
    sched.add(seq2)

    def each(out, tok):
        return {x.seq.seq_id: tok for x in out.scheduled if x.sample}

    out = sched.schedule()
    sched.update(out, each(out, 8))
    out = sched.schedule()
    sched.update(out, each(out, 9), {"s1": [99, 5]})  # the first bonus ends it: the second dropped
    assert out.bonus_applied == {"s1": 1} and seq2.token_ids[-1] == 99 and seq2.is_finished
    assert seq2.token_ids[3:] == [8, 9, 99]
    # near max_model_len the lookahead shrinks: never a position past it
    seq3 = make_seq(2, list(range(2, 13)), max_tokens=3, ignore_eos=True)
    sched.add(seq3)
    while not seq3.is_finished:
        out = sched.schedule()
        for x in out.scheduled:
            assert x.start + 1 + x.lookahead <= cfg.max_model_len
        sched.update(out, each(out, 1))
    sched.check_integrity()


def test_priority_policy_admits_by_priority_then_arrival():
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, block_size=4,
                          max_model_len=64, scheduling_policy="priority")  # fmt: skip
    sched = Scheduler(cfg, num_blocks=64)
    runner = FakeRunner(sched)
    for i, prio in enumerate([0, 5, -1, 5, -1]):
        sched.add(make_seq(i, range(i, i + 5), max_tokens=3, priority=prio))
    order = []
    while sched.has_unfinished():
        out = sched.schedule()
        order += [s.seq.seq_id for s in out.scheduled if s.start == 0]
        sched.update(out, runner.run(out))
    assert order == ["s2", "s4", "s0", "s1", "s3"]
    # FCFS ignores priorities (an engine refuses non-zero ones there: test_engine)
    fcfs = Scheduler(SchedulerConfig(max_num_seqs=1, block_size=4, max_model_len=64), 64)
    for i, prio in enumerate([0, 5, -1]):
        fcfs.add(make_seq(i, range(i, i + 5), max_tokens=3, priority=prio))
    assert [s.seq_id for s in fcfs.waiting] == ["s0", "s1", "s2"]


def test_priority_policy_preempts_the_least_urgent():
    """The cache runs out (as in test_preemption_recomputes_and_matches_reference, where FCFS
    preempts s2, the last admitted): under the priority policy the running sequence of the
    highest priority value goes, though admitted first, and waits at its place in order."""
    cfg = SchedulerConfig(max_num_batched_tokens=64, block_size=4, max_model_len=40,
                          scheduling_policy="priority")  # fmt: skip
    sched = Scheduler(cfg, num_blocks=12, num_checkpoint_slots=0)
    runner = FakeRunner(sched)
    seqs = [make_seq(i, range(10 * i, 10 * i + 10), max_tokens=20, priority=p)
            for i, p in enumerate([7, 0, 0])]  # fmt: skip
    for s in seqs:
        sched.add(s)
    preempted = []
    while sched.has_unfinished():
        out = sched.schedule()
        preempted += [p.seq_id for p in out.preempted]
        for p in out.preempted:  # never one more urgent than a sequence that kept running
            assert all(sched._order(p) > sched._order(r) for r in sched.running)
        assert list(sched.waiting) == sorted(sched.waiting, key=sched._order)
        sched.update(out, runner.run(out))
        sched.check_integrity()
    assert preempted and preempted[0] == "s0"
    for s in seqs:
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params, cfg)
    assert_all_released(sched)


def test_scheduling_policy_is_checked():
    with pytest.raises(ValueError, match="scheduling_policy"):
        SchedulerConfig(scheduling_policy="lifo")
