"""Speculative decoding with the checkpoint's MTP head: up to k draft tokens per decode step.

A step of a sequence whose last token x_n sits at position n and that holds drafts d_1..d_m
(m <= k) for positions n+1..n+m also runs them (the scheduler gave it KV blocks and budget for
them: `ScheduledSeq.lookahead`). Its first row is sampled as in any step, giving y_0; d_1 is
accepted iff y_0 == d_1, and then d_1's row is sampled too (y_1, a bonus token), d_2 accepted
iff y_1 == d_2, and so on: the step gives y_0 and one bonus per accepted draft. So every token
comes from the target model's own distribution, drawn in the same order from the same
generator as without drafts (greedy and seeded requests give the same tokens as without
speculation); a bad draft costs time only, never a different output.

A pure decode step runs the drafts as decode rows that the DeltaNet layers step in phases
after the others (`DecodeBatch.phases`: phase j holds the j-th drafts), so each row's arithmetic
is a decode step's (bf16 tokens equal bit for bit on a CPU); on a GPU such steps replay from
CUDA graphs like decode steps (engine/cuda_graphs.py `run_phased`). In a step with prefill rows
[x_n, d_1..d_m] is an (m+1)-token chunk (equal up to the chunked rule's rounding against
single-token steps). A
rejection must leave the DeltaNet state after the last accepted row: the state after each of
the rows x_n, d_1..d_{m-1} is saved during the forward into the sequence's spare slots (phase
copies, or `state_checkpoints` entries at offsets 1..m), and the right one is copied back; the
KV written for rejected drafts is overwritten by later steps. With every draft accepted the
state is the slot's own.

Drafts: after every step the MTP head (models/mtp.py) runs over all rows of the step with the
tokens that follow them (the prompt's next token, the sampled token, the bonus tokens) and writes
its own KV; the last confirmed row of each sequence gives the first draft (greedy). Further
drafts chain (as vLLM's and SGLang's MTP drafters do with one MTP layer): at the start of the
next step, once the scheduler has given the KV blocks, the head runs again on its own output row
and the previous draft, one row per sequence and draft, writing its KV at the positions the
step's own MTP pass then overwrites with the main model's hidden states. Every sequence is
drafted for: a grammar masks each bonus row after the drafts before it (structured/manager.py
apply) and each MTP draft after the tokens before it (model_runner._draft_tokens: a draft the
grammar forces is always right), logprobs come from each bonus token's own row; sequences with
images draft one token per step (the chain has no 3-D positions).

How many drafts (k > 1): by default min(k, lookahead) every step. A draft is worth its row
where the tokens it is expected to add outweigh what the row adds to the step's time, and both
differ by model and machine (measured on a 2-core CPU: a 4B model's third and fourth verify rows
cost about 0.45 of a decode step each, a 0.8B's about 0.1). With `adaptive`
(`--speculative-adaptive`, experimental) the engine times its pure decode steps by row count,
whole (scheduling, forward, sampling, drafting and detokenizing; `StepCost`; unmeasured row
counts estimated from the nearest measured ones, ROW_COST_PRIOR per row), each sequence's
per-draft acceptance is tracked (decayed counts, `acceptance`), and a step gives a sequence its
first draft and as many further ones as give the step the most expected tokens per second.
Measured, that is not reliably faster than k drafts every step: a shared machine's step timings
are too noisy for the choice (README, speculative decoding).

A verify step costs more than a decode step (more rows through every layer, the head for all,
the drafts' head reads), so drafts that keep failing cost time: after MISSES_BEFORE_PAUSE steps
in a row whose first draft was rejected a sequence decodes without drafts for 2, 4, ... up to
MAX_PAUSE steps (one draft after each pause probes again; an accepted one ends the back-off).
Steps with more than MAX_VERIFY_SEQS sampling sequences verify no drafts (a larger batch already
shares the weight reads a draft would save). The MTP layer still runs over every row, so its KV
stays complete for later drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice

MISSES_BEFORE_PAUSE = 2
ACCEPT_PRIOR = (1.4, 2.0)  # (accepted, tried) before any verify: 0.7 a draft
ACCEPT_DECAY = 0.9  # per verify step, on a sequence's counts
ROW_COST_PRIOR = 0.15  # an unmeasured step: per row, this fraction of a 1-row step more
STEP_COST_WEIGHT = 0.2  # of a new measurement in a row count's moving average
MAX_PAUSE = 64
# Steps that decode more sequences than this draft for none of them: a verify row costs a
# decode row's compute, which batches already share the weight reads for. Measured with
# `qwen35 bench --workload spec` (its `batches`, drafts always right; bf16, 2 threads, Zen 5):
# 0.8B 1.23x at 2 sequences and 0.83x at 4 (8 rows: past the head screen's row limit too);
# 4B 0.94x and 1.03x in one noisy run. Not settled: see the README.
MAX_VERIFY_SEQS = 2
# On a GPU a decode step stays bound by its weight reads well past 8 sequences x 4 rows (a
# dense 9B's projections at 32 rows: ~0.3 of the H200's bf16 GEMM peak at its bandwidth), and
# verify steps replay from CUDA graphs (engine/cuda_graphs.py): an estimate, not measured.
GPU_MAX_VERIFY_SEQS = 8


@dataclass
class SpecStats:
    drafts: int = 0  # drafts verified
    accepted: int = 0
    verifies: int = 0  # (sequence, step) pairs that verified drafts


@dataclass
class StepCost:
    """Seconds of pure decode steps by their rows (moving averages), and estimates for row
    counts not measured yet: between two measured ones, on the line between them; beyond them,
    the nearest one scaled by ROW_COST_PRIOR per row."""

    secs: dict[int, float] = field(default_factory=dict)

    def record(self, rows: int, secs: float) -> None:
        old = self.secs.get(rows)
        self.secs[rows] = secs if old is None else old + STEP_COST_WEIGHT * (secs - old)

    def __call__(self, rows: int) -> float:
        if rows in self.secs:
            return self.secs[rows]
        lo = max((r for r in self.secs if r < rows), default=None)
        hi = min((r for r in self.secs if r > rows), default=None)
        if lo is not None and hi is not None:
            return self.secs[lo] + (self.secs[hi] - self.secs[lo]) * (rows - lo) / (hi - lo)
        near = lo if lo is not None else hi
        if near is None:
            return 1.0 + ROW_COST_PRIOR * (rows - 1)
        return self.secs[near] * (1 + ROW_COST_PRIOR * rows) / (1 + ROW_COST_PRIOR * near)


@dataclass
class Verify:
    """One sequence of the step verifying drafts (keyed by its index in the scheduled list)."""

    drafts: list[int]  # d_1..d_m, for the positions after the sequence's last token
    spares: list[int]  # spares[j]: the state slot holding the state after row j (0..m-1)
    want: int = 0  # drafts the step has room for (the runner's chain extends drafts to it)


@dataclass
class Draft:
    """A sequence's first draft between steps: its token for position pos; hidden: the MTP
    head's output row that made it (the next step's chain continues from it), or None."""

    pos: int
    token: int
    hidden: object = None


@dataclass
class SpecState:
    """The runner's drafts between steps and the spare state slots it verifies with."""

    spare_slots: range  # k per sequence that can verify in one step
    k: int = 1  # drafts per step at most (num_speculative_tokens)
    drafts: dict[str, Draft] = field(default_factory=dict)  # seq_id -> its drafts
    stats: SpecStats = field(default_factory=SpecStats)
    # bench / tests: fn(seq, position) -> a draft token that replaces the MTP head's
    draft_override: object = None
    backoff: bool = True  # pause drafting after rejections (tests switch it off)
    max_verify_seqs: int = MAX_VERIFY_SEQS  # (tests raise it: batched verify steps)
    # rows a verify step of at most this many rows keeps to (None: any). On a CPU the largest
    # step whose projections stay GEMVs (layers/linear.py GEMV_MAX_ROWS), where a row costs
    # little beside the weight read (a GEMM past it does not). In bf16 each row's arithmetic is
    # then a decode row's at any row count, so greedy tokens equal those without drafts bit for
    # bit; fp32 rows past 4 take the kernels' paired-weight-row path (gemv_cpu.cpp
    # linear_fp32_rows), whose sums may differ from a decode row's in the last bit, so there
    # tokens are equal except at near-ties. Steps already longer (prefill chunks) draft without
    # the limit.
    max_rows: int | None = None
    adaptive: bool = False  # drafts 2..k only where they pay (above; --speculative-adaptive)
    # (min n, max n): drafts by prompt lookup (ngram_drafts) instead of the MTP head
    ngram: tuple[int, int] | None = None
    # n-gram drafts of a sequence under a grammar: fn(seq_id, drafts, k) -> the drafts the
    # grammar keeps, or the tokens it forces where it keeps none; None: not constrained
    # (StructuredOutputManager.drafts; the engine sets it)
    grammar: object = None
    cost: StepCost = field(default_factory=StepCost)  # (adaptive: the engine records steps)
    accept: dict[str, list[float]] = field(default_factory=dict)  # seq_id -> [accepted, tried]
    misses: dict[str, int] = field(default_factory=dict)  # seq_id -> rejections in a row
    paused: dict[str, int] = field(default_factory=dict)  # seq_id -> steps left without drafts

    def plan(self, scheduled) -> dict[int, Verify]:
        """Which scheduled sequences verify drafts this step, with their spare slots: each
        gets min(k, its lookahead) draft positions, fewer where a step within `max_rows`
        would pass it (shared out one draft at a time); its drafts so far (the runner's chain
        adds the rest, up to `want`)."""
        if sum(s.sample for s in scheduled) > self.max_verify_seqs:
            return {}
        cands = []  # (index, its drafts so far, draft positions wanted)
        for i, s in enumerate(scheduled):
            if not (s.lookahead and s.sample and s.num_new_tokens == 1):
                continue
            want = min(self.k, s.lookahead)
            pos = s.start + 1
            if self.ngram is not None:
                if not self.wants_draft(s.seq.seq_id):
                    continue
                toks = ngram_drafts(s.seq.token_ids, pos, want, *self.ngram)
                if self.grammar is not None and s.seq.params.structured_outputs is not None:
                    got = self.grammar(s.seq.seq_id, toks, want)
                    toks = toks if got is None else got
            elif self.draft_override is not None:
                toks = []
                for p in range(pos, pos + want):
                    t = self.draft_override(s.seq, p)
                    if t is None:
                        break
                    toks.append(int(t))
                want = len(toks)
            else:
                d = self.drafts.get(s.seq.seq_id)
                toks = [d.token] if d is not None and d.pos == pos else []
            if toks:
                cands.append((i, toks, want))
        if self.adaptive and self.k > 1 and cands:
            cands = self._lengths(scheduled, cands)
        rows = sum(s.num_new_tokens for s in scheduled)
        if self.max_rows is not None and rows <= self.max_rows:  # (a longer step is a GEMM
            room = self.max_rows - rows  # anyway): one more draft each in turn while rows last
            got = [0] * len(cands)
            while room > 0 and any(g < w for g, (_, _, w) in zip(got, cands, strict=True)):
                for n, (_, _, w) in enumerate(cands):
                    if got[n] < w and room > 0:
                        got[n], room = got[n] + 1, room - 1
            cands = [(i, t[:g], g) for g, (i, t, _) in zip(got, cands, strict=True) if g]
        out: dict[int, Verify] = {}
        spares = iter(self.spare_slots)
        for i, toks, want in cands:
            # a prefix-cache checkpoint after the first token already saves that state
            ck = [slot for off, slot in scheduled[i].checkpoints if off == 1]
            slots = ck[:1] + list(islice(spares, want - len(ck[:1])))
            if len(slots) < want:
                break
            out[i] = Verify(toks, slots, want)
        return out

    def acceptance(self, seq_id: str) -> float:
        """The sequence's chance that a draft is accepted once those before it were."""
        a, t = self.accept.get(seq_id, (0.0, 0.0))
        return (a + ACCEPT_PRIOR[0]) / (t + ACCEPT_PRIOR[1])

    def _lengths(self, scheduled, cands) -> list:
        """Draft positions per candidate: one each, then more one at a time, each to the
        candidate whose next draft is likeliest accepted; of these allotments the one with the
        most expected tokens per second of step (StepCost; measured costs need not rise
        evenly with rows, so not the first that stops improving)."""
        rows = sum(s.num_new_tokens for s in scheduled) + len(cands)
        p = [self.acceptance(scheduled[i].seq.seq_id) for i, _, _ in cands]
        got = [1] * len(cands)
        tokens = sum(s.sample for s in scheduled) + sum(p)  # expected this step
        best, best_rate, order = 0, tokens / self.cost(rows), []
        while True:
            n = max((n for n in range(len(cands)) if got[n] < cands[n][2]),
                    key=lambda n: p[n] ** (got[n] + 1), default=None)  # fmt: skip
            if n is None:
                break
            tokens += p[n] ** (got[n] + 1)
            got[n], rows = got[n] + 1, rows + 1
            order.append(n)
            if tokens / self.cost(rows) > best_rate:
                best, best_rate = len(order), tokens / self.cost(rows)
        got = [1] * len(cands)
        for n in order[:best]:
            got[n] += 1
        return [(i, t[:g], g) for g, (i, t, _) in zip(got, cands, strict=True)]

    def forget(self, seq_id: str) -> None:
        """The sequence has no draft now (finished, not drafted for, paused)."""
        self.drafts.pop(seq_id, None)

    def remove(self, seq_id: str) -> None:
        self.forget(seq_id)
        self.accept.pop(seq_id, None)
        self.misses.pop(seq_id, None)
        self.paused.pop(seq_id, None)

    def outcome(self, seq_id: str, drafted: int, accepted: int) -> None:
        """Count a sequence's verified drafts (the back-off above: a step whose first draft
        was rejected is a miss)."""
        self.stats.drafts += drafted
        self.stats.accepted += accepted
        self.stats.verifies += 1
        a, t = self.accept.get(seq_id, (0.0, 0.0))  # tried: the accepted ones and the first
        tried = accepted + (accepted < drafted)  # rejected one (those after it were not)
        self.accept[seq_id] = [ACCEPT_DECAY * a + accepted, ACCEPT_DECAY * t + tried]
        if accepted:
            self.misses.pop(seq_id, None)
            return
        m = self.misses[seq_id] = self.misses.get(seq_id, 0) + 1
        if m >= MISSES_BEFORE_PAUSE:
            self.paused[seq_id] = min(MAX_PAUSE, 2 ** (m - MISSES_BEFORE_PAUSE + 1))

    def wants_draft(self, seq_id: str) -> bool:
        """Whether to draft for the sequence this step (not during a pause)."""
        left = self.paused.get(seq_id, 0)
        if left and self.backoff:
            self.paused[seq_id] = left - 1
            return False
        return True


def ngram_drafts(tokens, end: int, k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt-lookup drafts (vLLM's `ngram` method, llama.cpp's lookup decoding): for n from
    n_max down to n_min, the last n of tokens[:end] looked up in what comes before them; the
    (up to k) tokens that followed their latest occurrence. [] when no n-gram recurs."""
    if end < n_min + 1 or k < 1:
        return []
    import numpy as np

    hist = np.asarray(tokens[:end], dtype=np.int64)
    for n in range(min(n_max, end - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(hist[: end - 1], n)  # starts < end-n
        hits = np.flatnonzero((windows == hist[end - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence's continuation
            return hist[start : min(start + k, end)].tolist()
    return []
