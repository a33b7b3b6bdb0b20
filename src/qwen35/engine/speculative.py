"""Speculative decoding with the checkpoint's MTP head: one draft token per decode step.

A step of a sequence whose last token x_n sits at position n and that holds a draft d for
position n+1 also runs d (the scheduler gave it a KV block and budget for n+1:
`ScheduledSeq.lookahead`). Its first row is sampled as in any step, giving y; the draft is
accepted iff y == d, and then the second row's token is sampled too (the bonus). So every token
comes from the target model's own distribution, drawn in the same order from the same
generator as without drafts (greedy and seeded requests give the same tokens as without
speculation); a bad draft costs time only, never a different output.

On a CPU a pure decode step runs the drafts as decode rows that the DeltaNet layers step after
the others (`DecodeBatch.phases`), so each row's arithmetic is a decode step's (bf16 tokens equal
bit for bit); elsewhere [x_n, d] is a 2-token chunk (equal up to the chunked rule's rounding
against a single-token step). On a rejection the DeltaNet state must not contain d: the state
after x_n is saved during the forward into a spare slot (a phase copy, or a `state_checkpoints`
entry at offset 1) and copied back; the KV written for d is overwritten by the next step. On
acceptance, d's KV and state are kept.

Drafts: after every step the MTP head (models/mtp.py) runs over all rows of the step with the
tokens that follow them (the prompt's next token, the sampled token, the bonus) and writes its
own KV; the last confirmed row of each sequence gives the next draft (greedy). Sequences with
structured outputs or logprobs are not drafted for (they decode one token per step).

A verify step costs more than a decode step (two rows through every layer, the head for both,
the draft's head read), so drafts that keep failing cost time: after MISSES_BEFORE_PAUSE
rejections in a row a sequence decodes without drafts for 2, 4, ... up to MAX_PAUSE steps
(one draft after each pause probes again; an accepted one ends the back-off). Steps with more
than MAX_VERIFY_SEQS sampling sequences verify no drafts (a larger batch already shares the
weight reads a draft would save). The MTP layer still runs over every row, so its KV stays
complete for later drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MISSES_BEFORE_PAUSE = 2
MAX_PAUSE = 64
# Steps that decode more sequences than this draft for none of them: a verify row costs a
# decode row's compute, which batches already share the weight reads for. Measured with
# `qwen35 bench --workload spec` (its `batches`, drafts always right; bf16, 2 threads, Zen 5):
# 0.8B 1.23x at 2 sequences and 0.83x at 4 (8 rows: past the head screen's row limit too);
# 4B 0.94x and 1.03x in one noisy run. Not settled: see the README.
MAX_VERIFY_SEQS = 2


@dataclass
class SpecStats:
    drafts: int = 0  # drafts verified
    accepted: int = 0


@dataclass
class Verify:
    """One sequence of the step verifying a draft (keyed by its index in the scheduled list)."""

    draft: int
    spare: int  # state slot holding the state after the first token


@dataclass
class SpecState:
    """The runner's drafts between steps and the spare state slots it verifies with."""

    spare_slots: range  # one per sequence that can verify in one step
    drafts: dict[str, tuple[int, int]] = field(default_factory=dict)  # seq_id -> (pos, token)
    stats: SpecStats = field(default_factory=SpecStats)
    # bench / tests: fn(seq, position) -> a draft token that replaces the MTP head's
    draft_override: object = None
    backoff: bool = True  # pause drafting after rejections (tests switch it off)
    max_verify_seqs: int = MAX_VERIFY_SEQS  # (tests raise it: batched verify steps)
    misses: dict[str, int] = field(default_factory=dict)  # seq_id -> rejections in a row
    paused: dict[str, int] = field(default_factory=dict)  # seq_id -> steps left without drafts

    def plan(self, scheduled) -> dict[int, Verify]:
        """Which scheduled sequences verify a draft this step, with their spare slots."""
        out: dict[int, Verify] = {}
        if sum(s.sample for s in scheduled) > self.max_verify_seqs:
            return out
        spares = iter(self.spare_slots)
        for i, s in enumerate(scheduled):
            if not (s.lookahead and s.sample and s.num_new_tokens == 1):
                continue
            pos = s.start + 1
            if self.draft_override is not None:
                tok = self.draft_override(s.seq, pos)
            else:
                d = self.drafts.get(s.seq.seq_id)
                tok = d[1] if d is not None and d[0] == pos else None
            if tok is None or not eligible(s.seq.params):
                continue
            # a prefix-cache checkpoint after the first token already saves that state
            ck = [slot for off, slot in s.checkpoints if off == 1]
            spare = ck[0] if ck else next(spares, None)
            if spare is None:
                break
            out[i] = Verify(int(tok), spare)
        return out

    def forget(self, seq_id: str) -> None:
        """The sequence has no draft now (finished, not drafted for, paused)."""
        self.drafts.pop(seq_id, None)

    def remove(self, seq_id: str) -> None:
        self.forget(seq_id)
        self.misses.pop(seq_id, None)
        self.paused.pop(seq_id, None)

    def outcome(self, seq_id: str, accepted: bool) -> None:
        """Count a verified draft of the sequence (the back-off above)."""
        self.stats.drafts += 1
        self.stats.accepted += accepted
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


def eligible(params) -> bool:
    """Requests a draft is made for: not constrained by a grammar (its mask would have to
    advance over the draft), no logprobs (one entry per step)."""
    return params.structured_outputs is None and params.logprobs is None
