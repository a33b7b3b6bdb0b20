"""Hybrid prefix caching: KV blocks + DeltaNet state checkpoints, driven through the scheduler with
the fake runner of test_scheduler (which checks restored states and shared KV on every step)."""

from __future__ import annotations

import random

import pytest

from qwen35.engine.scheduler import Scheduler, SchedulerConfig
from test_scheduler import (
    VOCAB,
    FakeRunner,
    assert_all_released,
    make_seq,
    reference_output,
    run_steps,
)


def setup(bs=4, interval=None, budget=256, max_len=512, blocks=None, ckpts=64, **kw):
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget,
        block_size=bs,
        checkpoint_interval=interval or bs,
        max_model_len=max_len,
        **kw,
    )
    sched = Scheduler(cfg, blocks or 2 * max_len // bs, num_checkpoint_slots=ckpts)
    return cfg, sched, FakeRunner(sched)


def run(sched, runner, *seqs):
    for s in seqs:
        sched.add(s)
    done, _, _ = run_steps(sched, runner)
    cfg = sched.config
    for s in seqs:
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params, cfg)
    return done


def first_chunk(runner, seq_id):
    return next(e for e in runner.log if e[0] == seq_id)


def rand_tokens(rng, n):
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.mark.parametrize("interval, expect", [(16, 96), (4, 100)])
def test_shared_prefix_of_100_tokens(interval, expect):
    rng = random.Random(0)
    prefix = rand_tokens(rng, 100)
    cfg, sched, runner = setup(interval=interval)
    a = make_seq(0, prefix + rand_tokens(rng, 10), max_tokens=4)
    b = make_seq(1, prefix + rand_tokens(rng, 10), max_tokens=4)
    run(sched, runner, a)
    run(sched, runner, b)
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == expect
    _, start, n, restore, _ = first_chunk(runner, "s1")
    assert start == expect and n == 110 - expect and restore >= sched.state.num_slots
    st = sched.prefix_cache_stats()
    assert (st.queries, st.hits, st.hit_tokens, st.query_tokens) == (2, 1, expect, 220)
    assert st.hit_rate == pytest.approx(expect / 220)
    assert_all_released(sched)
    assert sched.kv.num_cached_blocks > 0  # released to the cache, not forgotten


def test_shared_prefix_of_5000_tokens_small_blocks():
    rng = random.Random(1)
    prefix = rand_tokens(rng, 5000)
    cfg, sched, runner = setup(bs=8, interval=256, budget=1024, max_len=6000)
    a = make_seq(0, prefix + rand_tokens(rng, 30), max_tokens=2)
    b = make_seq(1, prefix + rand_tokens(rng, 30), max_tokens=2)
    run(sched, runner, a)
    run(sched, runner, b)
    assert b.num_cached_tokens == 4864  # 19 * 256: the last checkpoint inside the shared 5000
    assert sum(e[2] for e in runner.log if e[0] == "s1") == 5030 - 4864 + 1
    assert_all_released(sched)


def test_prefix_ending_mid_block_hits_only_full_blocks():
    rng = random.Random(2)
    prefix = rand_tokens(rng, 10)
    cfg, sched, runner = setup()
    a = make_seq(0, prefix + [1, 1, 1, 1, 1, 1], max_tokens=3)
    b = make_seq(1, prefix + [2, 2, 2, 2, 2, 2], max_tokens=3)
    run(sched, runner, a)
    sched.add(b)
    out = sched.schedule()
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_ids[:2] == sched.kv.match_prefix(a.block_hashes[:2])  # a's cached blocks
    assert sched.kv.ref_counts[b.block_ids[2]] == 1  # the partial third block is its own
    sched.update(out, runner.run(out))
    run(sched, runner)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, b.params, cfg)


def test_exactly_one_block():
    cfg, sched, runner = setup(bs=4)
    run(sched, runner, make_seq(0, [5, 6, 7, 8, 9, 10], max_tokens=2))
    b = make_seq(1, [5, 6, 7, 8, 1], max_tokens=2)
    run(sched, runner, b)
    assert b.num_cached_tokens == 4
    c = make_seq(2, [5, 6, 7, 9, 1], max_tokens=2)  # differs inside the first block
    run(sched, runner, c)
    assert c.num_cached_tokens == 0


def test_back_off_when_the_whole_prompt_is_cached():
    prompt = list(range(1, 17))  # 16 tokens = 4 blocks of 4
    # interval 16 without the prompt-end checkpoint: the only checkpoint sits at 16 = the whole
    # prompt, which must not be used (no logits row); nothing earlier -> no hit.
    cfg, sched, runner = setup(interval=16, checkpoint_prompt_end=False)
    a, b = make_seq(0, prompt, max_tokens=3), make_seq(1, prompt, max_tokens=3)
    run(sched, runner, a)
    run(sched, runner, b)
    assert b.num_cached_tokens == 0 and a.output_token_ids == b.output_token_ids
    # with the prompt-end checkpoint (last block boundary inside the prompt: 12) it hits 12
    cfg, sched, runner = setup(interval=16)
    a, b = make_seq(0, prompt, max_tokens=3), make_seq(1, prompt, max_tokens=3)
    run(sched, runner, a)
    run(sched, runner, b)
    assert b.num_cached_tokens == 12 and first_chunk(runner, "s1")[1:3] == (12, 4)
    assert a.output_token_ids == b.output_token_ids


def test_checkpoint_placement_in_chunks_and_decode():
    cfg, sched, runner = setup(interval=8, budget=12)
    seq = make_seq(0, list(range(1, 51)), max_tokens=10)
    run(sched, runner, seq)
    ns = sched.state.num_slots
    placed = [(start, [n for n, _ in ck]) for _, start, _, _, ck in runner.log]
    assert all(slot >= ns for *_, ck in runner.log for _, slot in ck)
    # prefill chunks of 12: boundaries 8 | 16, 24 | 32 | 40, 48 | (48 = prompt end, exists)
    assert placed[:5] == [(0, [8]), (12, [4, 12]), (24, [8]), (36, [4, 12]), (48, [])]
    # decode: token 56 crosses a multiple of 8 in the step starting at 55
    assert [(s, n) for s, n in placed[5:] if n] == [(55, [1])]
    assert sched.state.num_checkpoints == 7


def test_branch_point_checkpoint_serves_later_requests():
    """A shared system prompt shorter than the interval: the first request leaves no checkpoint
    inside it, the second finds the KV match and checkpoints its end, the third hits it all."""
    rng = random.Random(6)
    system = rand_tokens(rng, 100)
    cfg, sched, runner = setup(bs=16, interval=256)
    seqs = [make_seq(i, system + rand_tokens(rng, 20), max_tokens=2) for i in range(3)]
    for s in seqs:
        run(sched, runner, s)
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 96]
    assert seqs[1].branch_point == 96
    assert [ck for sid, _, _, _, ck in runner.log if sid == "s1"][0][0][0] == 96


def _questions_between_prompts(seed: int, ckpts: int, other: int):
    """A 100-token document asked 4 questions, each followed by an unrelated `other`-token
    prompt, in `ckpts` checkpoint slots. -> (scheduler, runner, the questions' sequences)."""
    rng = random.Random(seed)
    doc = rand_tokens(rng, 100)
    cfg, sched, runner = setup(interval=16, ckpts=ckpts)
    asked = []
    for i in range(4):
        asked.append(make_seq(2 * i, doc + rand_tokens(rng, 10), max_tokens=2))
        run(sched, runner, asked[-1])
        run(sched, runner, make_seq(2 * i + 1, rand_tokens(rng, other), max_tokens=2))
    return sched, runner, asked


def test_a_long_prompt_does_not_flush_the_branch_points():
    """Three checkpoint slots, a document asked questions between unrelated long prompts: the
    second question finds the document's end (its KV match) and checkpoints it there; the long
    prompts' periodic checkpoints then evict only each other, so every later question starts
    from it (plain LRU let each long prompt evict it: every question computed the document)."""
    sched, runner, asked = _questions_between_prompts(7, ckpts=3, other=200)
    assert [s.num_cached_tokens for s in asked] == [0, 0, 100, 100]
    assert_all_released(sched)


def test_one_slot_keeps_the_branch_point_over_prompt_ends():
    """One checkpoint slot (a 27B's on a CPU by default): a raw prompt's end does not evict a
    branch point; it evicts only another prompt end or a periodic checkpoint."""
    sched, runner, asked = _questions_between_prompts(9, ckpts=1, other=60)
    assert [s.num_cached_tokens for s in asked] == [0, 0, 100, 100]
    again = make_seq(9, list(asked[0].prompt_token_ids), max_tokens=2)
    run(sched, runner, again)
    assert again.num_cached_tokens == 100  # (its own prompt end was evicted long ago)
    assert_all_released(sched)


def test_few_slots_keep_checkpoints_at_doubling_depths():
    """Three slots for one 130-token prompt's eight periodic boundaries (every 16) and its end:
    the end, then 64 and 32 (1, 2, 4... intervals), not the deepest 112 and 96; a prompt that
    shares 70 tokens then resumes at 64."""
    rng = random.Random(10)
    cfg, sched, runner = setup(interval=16, ckpts=3)
    a = make_seq(0, rand_tokens(rng, 130), max_tokens=1)
    run(sched, runner, a)
    held = [t for t in range(4, 132, 4) if sched.state.lookup(a.block_hashes[t // 4 - 1])]
    assert held == [32, 64, 128]
    b = make_seq(1, a.prompt_token_ids[:70] + rand_tokens(rng, 20), max_tokens=1)
    run(sched, runner, b)
    assert b.num_cached_tokens == 64


def test_one_slot_keeps_the_deeper_cache_point():
    """One slot, a chat's two cache points in one step (its system prompt's end at 64, four
    intervals; the conversation's at 96, six): the deeper is kept, so the next turn resumes
    after the whole conversation (the doubling-depth order is for periodic ones only)."""
    rng = random.Random(11)
    system, talk, opening = rand_tokens(rng, 64), rand_tokens(rng, 32), rand_tokens(rng, 6)
    cfg, sched, runner = setup(interval=16, ckpts=1)
    a = make_seq(0, system + talk + opening, max_tokens=4, cache_points=(64, 96))
    run(sched, runner, a)
    b = make_seq(1, system + talk + rand_tokens(rng, 30), max_tokens=2, cache_points=(64, 120))
    run(sched, runner, b)
    assert b.num_cached_tokens == 96


def test_one_slot_moves_along_a_conversation():
    """One slot (a 27B on a CPU by default), one conversation: each turn resumes where the
    conversation before the last reply ended, and writes the next such point into the slot of
    the one it resumed from (plain LRU needed periodic checkpoints in the decode to move on)."""
    rng = random.Random(12)
    cfg, sched, runner = setup(interval=16, ckpts=1)
    history, cached, points = rand_tokens(rng, 40), [], [0]
    for i in range(5):
        before = history + rand_tokens(rng, 20)  # + the user's message
        s = make_seq(i, before + rand_tokens(rng, 4), max_tokens=6, cache_points=(40, len(before)))
        run(sched, runner, s)
        cached.append(s.num_cached_tokens)
        points.append(len(before) // 4 * 4)  # (block size 4)
        history = before + s.output_token_ids
    assert cached == points[:-1]  # each turn from the point the turn before it left
    assert sched.state.lookup(s.block_hashes[points[-1] // 4 - 1]) is not None
    assert_all_released(sched)


def test_a_chats_cache_points_outlive_a_long_prompt():
    """The conversation before a reply is checkpointed (its next turn goes on from there); an
    unrelated long prompt's periodic checkpoints in between do not evict it."""
    rng = random.Random(8)
    system, user, opening = rand_tokens(rng, 40), rand_tokens(rng, 60), rand_tokens(rng, 6)
    cfg, sched, runner = setup(interval=16, ckpts=3)
    # cache points: the system prompt's end and the conversation before the reply's opening
    a = make_seq(0, system + user + opening, max_tokens=6, cache_points=(40, 100))
    run(sched, runner, a)
    run(sched, runner, make_seq(1, rand_tokens(rng, 200), max_tokens=2))
    b = make_seq(2, system + user + a.output_token_ids + rand_tokens(rng, 20), max_tokens=2,
                 cache_points=(40, 126))  # fmt: skip
    run(sched, runner, b)
    assert b.num_cached_tokens == 100
    assert_all_released(sched)


def test_concurrent_request_hits_only_what_is_computed():
    rng = random.Random(3)
    prefix = rand_tokens(rng, 64)
    cfg, sched, runner = setup(interval=16, budget=48, max_chunk_tokens=16)
    a = make_seq(0, prefix + [1], max_tokens=3)
    sched.add(a)
    for _ in range(2):  # two chunks of 16: 32 computed, checkpoints at 16 and 32
        out = sched.schedule()
        sched.update(out, runner.run(out))
    b = make_seq(1, prefix + [2], max_tokens=3)
    c = make_seq(2, prefix + [3], max_tokens=3)
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.start) for s in out.scheduled] == [("s0", 32), ("s1", 32), ("s2", 32)]
    assert b.block_ids[:8] == a.block_ids[:8] == c.block_ids[:8]
    assert sched.kv.ref_counts[a.block_ids[0]] == 3
    sched.update(out, runner.run(out))
    sched.check_integrity()
    run_steps(sched, runner)
    for s in (a, b, c):
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params, cfg)
    assert b.num_cached_tokens == c.num_cached_tokens == 32


def test_same_step_admissions_do_not_hit():
    """n > 1 style: identical prompts admitted together compute independently (correct, no hit)."""
    cfg, sched, runner = setup(interval=4)
    seqs = [make_seq(i, list(range(1, 30)), max_tokens=4) for i in range(4)]
    run(sched, runner, *seqs)
    assert all(s.num_cached_tokens == 0 for s in seqs)
    assert len({tuple(s.output_token_ids) for s in seqs}) == 1


def test_eviction_under_pressure_then_recompute():
    rng = random.Random(4)
    prefix = rand_tokens(rng, 40)
    # 16 blocks of 4 = 64 tokens: one other request evicts everything a left behind
    cfg, sched, runner = setup(interval=8, max_len=60, blocks=16, ckpts=3)
    a = make_seq(0, prefix + [1], max_tokens=2)
    run(sched, runner, a)
    run(sched, runner, make_seq(1, rand_tokens(rng, 55), max_tokens=4))
    b = make_seq(2, prefix + [2], max_tokens=3)
    run(sched, runner, b)
    st = sched.prefix_cache_stats()
    assert b.num_cached_tokens == 0 and st.block_evictions > 0 and st.checkpoint_evictions > 0
    assert_all_released(sched)


def test_checkpoint_eviction_shortens_the_hit():
    rng = random.Random(5)
    prefix = rand_tokens(rng, 32)
    cfg, sched, runner = setup(interval=8, ckpts=2, checkpoint_prompt_end=False)
    a = make_seq(0, prefix + [1, 1], max_tokens=1)
    run(sched, runner, a)
    # 2 slots for 4 boundaries in one chunk: 32 and 16 (4 and 2 intervals), not 24
    hashes = a.block_hashes
    kept = [t for t in (8, 16, 24, 32) if sched.state.lookup(hashes[t // 4 - 1]) is not None]
    assert kept == [16, 32]
    b = make_seq(1, prefix[:20] + [9] * 8, max_tokens=1)  # KV shared up to 20
    run(sched, runner, b)
    assert b.num_cached_tokens == 16
    # b's branch point (20, where its KV match ended) evicted a's 32 (16 is b's: restored, so
    # kept), and b's 24 found nothing periodic to evict
    assert sched.state.lookup(hashes[32 // 4 - 1]) is None
    c = make_seq(2, prefix + [7], max_tokens=2)
    run(sched, runner, c)
    assert c.num_cached_tokens == 20
    # and c's branch point (32: its KV match ran through a's blocks) evicted 16
    assert sched.prefix_cache_stats().checkpoint_evictions == 2


def test_resume_after_preemption_reuses_its_own_blocks():
    cfg, sched, runner = setup(interval=4, max_len=40, blocks=12, budget=64)
    seqs = [make_seq(i, list(range(10 * i + 1, 10 * i + 21)), max_tokens=18) for i in range(2)]
    run(sched, runner, *seqs)
    st = sched.prefix_cache_stats()
    assert sched.num_preemptions >= 1 and st.hits >= 1
    assert all(s.num_cached_tokens == 0 for s in seqs)  # only first admissions count there


def test_disabled_prefix_caching():
    prefix = list(range(1, 41))
    cfg, sched, runner = setup(enable_prefix_caching=False)
    a, b = make_seq(0, prefix + [1], max_tokens=2), make_seq(1, prefix + [2], max_tokens=2)
    run(sched, runner, a)
    run(sched, runner, b)
    assert b.num_cached_tokens == 0 and sched.state.total_slots == sched.state.num_slots
    assert all(not ck and r is None for *_, r, ck in runner.log)
    assert sched.kv.num_cached_blocks == 0 and sched.prefix_cache_stats().queries == 0


def test_cache_salt_separates_equal_tokens():
    prefix = list(range(1, 41))
    cfg, sched, runner = setup()
    run(sched, runner, make_seq(0, prefix + [1], max_tokens=2))
    b = make_seq(1, prefix + [2], max_tokens=2)
    b.cache_salt = "image-sha"
    run(sched, runner, b)
    c = make_seq(2, prefix + [3], max_tokens=2)
    c.cache_salt = "image-sha"
    run(sched, runner, c)
    assert b.num_cached_tokens == 0 and c.num_cached_tokens == 40


def test_reset_prefix_cache():
    prefix = list(range(1, 41))
    cfg, sched, runner = setup()
    run(sched, runner, make_seq(0, prefix + [1], max_tokens=2))
    sched.reset_prefix_cache()
    b = make_seq(1, prefix + [2], max_tokens=2)
    run(sched, runner, b)
    assert b.num_cached_tokens == 0
    sched.check_integrity()
