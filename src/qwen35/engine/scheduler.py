"""Continuous batching over token counts (vLLM v1 style), with hybrid prefix caching.

Each step every sequence's `num_computed_tokens` catches up with `num_tokens` under one token
budget, so chunked prefill, decode and mixed batches are one code path. Running sequences go
first (oldest first), then waiting ones are admitted FCFS while budget, `max_num_seqs`, a state
slot and KV blocks last (with `short_first`, short prompts go ahead of a running prompt's
chunk: `Scheduler._short_grants`). A running sequence that cannot get a block preempts the
most recently admitted one (recompute: its caches are freed and it goes back to the front of
`waiting`).
Under `scheduling_policy="priority"` both orders are (params.priority, arrival) instead: running
sequences are scheduled most urgent first, the least urgent is preempted, and waiting ones are
admitted in that order (a running sequence is never preempted to admit a waiting one).

Engine loop: `out = schedule()`; the runner executes `out.scheduled` (see ScheduledSeq);
`finished = update(out, {seq_id: token})`; `finish(seq_id)` for stop strings; `abort(seq_id)`.
Every schedule() must be followed by update() with its output. No torch here.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

from qwen35.engine.kv_cache import KVBlockPool, _check, extend_block_hashes
from qwen35.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus
from qwen35.engine.state_cache import KEPT, PERIODIC, PROMPT_END, StatePool

# Prompt chunks cut by a step's prefill cap end on multiples of this many positions: the CPU
# DeltaNet kernel's chunk grid, where a cut prompt continues to the uncut prompt's bits.
PREFILL_GRID = 64
# How far down the waiting queue a step looks for short prompts to start beside a long one's
# chunk (Scheduler._short_picks).
SHORT_SCAN = 128
# A prompt of up to this many tokens that does not fit whole beside a long prompt's chunk still
# starts beside it, chunk by chunk, ahead of the long one (Scheduler._short_picks): a chat turn
# with its system prompt, where a step allows few prompt tokens (a larger model on a CPU).
SHORT_PROMPT_TOKENS = 1024


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_checkpoint_interval(block_size: int) -> int:
    """About every 256 tokens, on a block boundary. Each checkpoint is a full DeltaNet state
    and a copy, so fewer is cheaper; a resume recomputes fewer than 256 tokens. Prompt ends and
    branch points get their own checkpoints, and those on the 64-token chunk grid cost no extra
    kernel call (layers/deltanet.py `_segments`)."""
    return block_size * max(1, round(256 / block_size))


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running sequences at once
    max_num_batched_tokens: int = 8192  # token budget of one step
    max_model_len: int = 32768  # prompt + output
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    checkpoint_interval: int = 0  # tokens between state checkpoints; 0: about 256, block-aligned
    # Also checkpoint at the last block boundary inside the prompt (repeated prompts, n > 1).
    # Checkpoints also go where a new request's KV match ran past its deepest checkpoint (a
    # shared prefix discovered at admission), so later requests hit all of it.
    checkpoint_prompt_end: bool = True
    max_chunk_tokens: int = 0  # per-sequence cap per step (long prefills share steps); 0: none
    # Vision-encoder tokens per step: a chunk stops before an image / video that would pass it,
    # unless it is the step's first (so every item fits somewhere); 0: max_num_batched_tokens.
    max_num_encoder_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    # speculative decoding: a decode step may also run this many draft tokens after the last
    # token (KV blocks and budget for them; ScheduledSeq.lookahead); 0: off
    num_lookahead_tokens: int = 0
    # "fcfs": waiting sequences run in arrival order; "priority": by (params.priority, arrival),
    # lower first, and a preemption takes the running sequence last in that order
    scheduling_policy: str = "fcfs"
    # prompts of up to this many tokens are short: they go ahead of a long prompt's chunk when
    # short prompts go first (schedule(short_first=True)); vLLM's long_prefill_token_threshold
    short_prompt_tokens: int = SHORT_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        if self.short_prompt_tokens < 0:
            raise ValueError(f"short_prompt_tokens must be >= 0, got {self.short_prompt_tokens}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bs = self.block_size
        if self.checkpoint_interval == 0:
            object.__setattr__(self, "checkpoint_interval", default_checkpoint_interval(bs))
        if self.checkpoint_interval < 0 or self.checkpoint_interval % bs:
            raise ValueError(
                f"checkpoint_interval ({self.checkpoint_interval}) must be a positive multiple "
                f"of block_size ({bs}): checkpoints sit on KV block boundaries"
            )
        if self.max_chunk_tokens < 0:
            raise ValueError(f"max_chunk_tokens must be >= 0, got {self.max_chunk_tokens}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))


@dataclass(slots=True)
class ScheduledSeq:
    """Run tokens seq.token_ids[start : start + num_new_tokens] of `seq` this step.

    The runner's ForwardBatch row for it: positions start..start+n-1; context_len start+n;
    slot_mapping[p] = seq.block_ids[p // bs] * bs + p % bs; block table seq.block_ids; state
    slot seq.state_slot; has_initial_state = start > 0 (else the slot holds stale data: zeros);
    a logits row for the last new token iff `sample`. Before the forward, copy the conv and
    recurrent state of every `restore_from` slot into seq.state_slot (all restores of a step
    before any checkpoint write); after n new tokens, copy the state into each checkpoint slot.
    """

    seq: Sequence
    start: int  # num_computed_tokens before this step (KV positions 0..start-1 are cached)
    num_new_tokens: int
    sample: bool  # the chunk reaches the last known token: sample the next one from its logits
    # Checkpoint slot to copy into seq.state_slot BEFORE running (prefix-cache hit; start > 0).
    restore_from: int | None = None
    # (n, slot): after the first n new tokens (1 <= n <= num_new_tokens) copy the state into
    # checkpoint `slot` (ForwardBatch.state_checkpoints entry (i, n, slot)).
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    # a decode step: positions start+1 .. start+lookahead have KV blocks and budget for draft
    # tokens the runner may verify in the same forward (speculative decoding)
    lookahead: int = 0

    @property
    def has_initial_state(self) -> bool:
        return self.start > 0

    @property
    def is_decode(self) -> bool:
        """One token that reaches the end of what is known (a prompt's last lone token too)."""
        return self.num_new_tokens == 1 and self.sample


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    # set by update(): seq_id -> how many of its bonus tokens (speculative decoding) it took
    bonus_applied: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of the step's prompt chunks (rows that are not a decode step's)."""
        return sum(s.num_new_tokens for s in self.scheduled if not s.is_decode)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # admissions looked up (first admissions and resumes)
    hits: int = 0  # admissions with a hit
    query_tokens: int = 0  # known tokens at those admissions
    hit_tokens: int = 0  # tokens not recomputed thanks to a hit
    num_cached_blocks: int = 0
    num_checkpoints: int = 0
    checkpoint_capacity: int = 0
    block_evictions: int = 0
    checkpoint_evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


_STATUS = {reason: status for status, reason in FINISH_REASONS.items()}


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        num_slots: int | None = None,
        num_checkpoint_slots: int = 0,
    ):
        bs = config.block_size
        if num_blocks < cdiv(config.max_model_len, bs):
            raise ValueError(
                f"{num_blocks} KV blocks of {bs} tokens cannot hold one sequence of "
                f"max_model_len={config.max_model_len}; lower max_model_len or add memory"
            )
        self.config = config
        self.kv = KVBlockPool(num_blocks, bs)
        ckpt = num_checkpoint_slots if config.enable_prefix_caching else 0
        self.state = StatePool(num_slots or config.max_num_seqs, ckpt)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._stats = PrefixCacheStats()
        self.num_preemptions = 0
        self._encoder_used = 0  # vision-encoder tokens scheduled in the current step
        self._prefill_left = 0  # prompt tokens the current step may still take (schedule())
        self._prefill_taken = False  # whether a prompt chunk is in the current step yet
        self._short_ids: set[str] = set()  # short prompts started beside a long one, mid-prefill

    # ---- requests ----

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id!r} is already scheduled")
        if not 0 < seq.num_tokens <= self.config.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens; it must have 1 to max_model_len="
                f"{self.config.max_model_len} tokens"
            )
        seq.arrival = next(self._arrivals)
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=False)
        self._seqs[seq.seq_id] = seq

    def _order(self, seq: Sequence) -> tuple[int, int]:
        """Where `seq` stands under the priority policy: lower runs first."""
        return seq.params.priority, seq.arrival

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """Into `waiting`: FCFS at the back (new) or the front (preempted); by priority at its
        place in (priority, arrival) order (a preempted sequence keeps its old arrival)."""
        if self.config.scheduling_policy == "fcfs":
            if front:
                self.waiting.appendleft(seq)
            else:
                self.waiting.append(seq)
            return
        key = self._order(seq)
        i = len(self.waiting)
        while i > 0 and self._order(self.waiting[i - 1]) > key:
            i -= 1
        self.waiting.insert(i, seq)

    def abort(self, seq_id: str) -> bool:
        return self.finish(seq_id, "abort")

    def finish(self, seq_id: str, reason: str = "stop", stop_reason: int | str | None = None):
        """End a sequence now ("stop" | "length" | "abort" | "error"), freeing its caches. False
        if unknown (already finished). Call between steps, or between schedule() and update()
        (update() then skips it and cancels its checkpoint reservations)."""
        if reason not in _STATUS:
            raise ValueError(f"finish reason must be one of {sorted(_STATUS)}, got {reason!r}")
        seq = self._seqs.get(seq_id)
        if seq is None:
            return False
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, _STATUS[reason], stop_reason)
        return True

    def get(self, seq_id: str) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----

    def schedule(self, decode_prefill_cap: int = 0, short_first: bool = False) -> SchedulerOutput:
        """decode_prefill_cap: in a step where a running sequence decodes, at most this many
        prompt tokens (chunks cut there end on the PREFILL_GRID where they can), so streams in
        flight are not held up behind a long prompt (the engine's PrefillPacer sets it); 0: none.
        short_first: short prompts (running or waiting) take the allowance ahead of a running
        prompt's chunk, which keeps one PREFILL_GRID, rather than waiting for its last chunk,
        also past waiting prompts that are not short where those keep their seat and memory
        (`_short_grants`)."""
        cfg, out = self.config, SchedulerOutput()
        self.state.begin_step()
        self._encoder_used = 0
        budget = cfg.max_num_batched_tokens
        left = {s.num_tokens - s.num_computed_tokens for s in self.running}  # 1: decoding
        decoding = decode_prefill_cap > 0 and 1 in left
        allowance = min(decode_prefill_cap, budget) if decoding else budget
        prefilling = any(n > 1 for n in left)  # a running prompt mid-prefill
        grants: dict[str, int] = {}  # short prompts' tokens of the allowance, ahead of the rest
        picks = self._short_grants(allowance, grants) if short_first and prefilling else []
        self._prefill_left, self._prefill_taken = allowance - sum(grants.values()), False
        if cfg.scheduling_policy == "priority":  # the most urgent first; the last is preempted
            self.running.sort(key=self._order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, seq.num_computed_tokens, budget, grants.get(seq.seq_id))
            if n == 0:  # waits for the next step's encoder budget
                i += 1
                continue
            la = self._lookahead(seq, n, budget)
            if la and not self._grow(seq, n + la):
                la = 0  # no block for a draft: decode without one rather than preempt
            while not self._grow(seq, n):
                victim = self.running.pop()  # most recently admitted; never one scheduled already
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            out.scheduled.append(self._plan(seq, n, None))
            out.scheduled[-1].lookahead = la
            budget -= n + la
            i += 1
        # Admitting right after a preemption would only preempt again.
        for seq in picks if not out.preempted else ():  # the queue's short prompts first
            if not (budget > 0 and self._has_seat()):
                break
            n = self._admit(seq, budget, out, grants[seq.seq_id])
            if not n:
                break
            self._short_ids.add(seq.seq_id)
            budget -= n
        while not out.preempted and self.waiting and budget > 0 and self._has_seat():
            n = self._admit(self.waiting[0], budget, out)
            if not n:
                break  # FCFS: later requests wait behind the head
            budget -= n
        out.num_batched_tokens = cfg.max_num_batched_tokens - budget
        return out

    def update(
        self,
        output: SchedulerOutput,
        sampled: dict[str, int],
        bonus: dict[str, list[int]] | None = None,
    ) -> list[Sequence]:
        """Apply a finished step: advance computed counts, append sampled tokens, register new
        full blocks and checkpoints, finish sequences that hit a stop condition (returned).
        bonus: speculative decoding, seq_id -> the tokens sampled after its accepted drafts
        (the first draft is the sampled token, each later one the bonus token before it, their
        KV already written): appended after the sampled one until one finishes the sequence
        (`output.bonus_applied`: how many each took)."""
        bs, finished = self.config.block_size, []
        for s in output.scheduled if bonus else ():  # (checked before anything changes)
            if len(bonus.get(s.seq.seq_id, ())) > s.lookahead:
                raise ValueError(f"{s.seq.seq_id}: more bonus tokens than draft positions")
        for s in output.scheduled:
            seq = s.seq
            ckpt_hashes = [seq.block_hashes[(s.start + n) // bs - 1] for n, _ in s.checkpoints]
            if seq.is_finished:  # aborted between schedule() and update()
                for h in ckpt_hashes:
                    self.state.cancel(h)
                continue
            if seq.num_computed_tokens != s.start:
                raise ValueError(f"{seq.seq_id}: output applied twice or out of order")
            for h in ckpt_hashes:
                self.state.commit(h)
            seq.num_computed_tokens += s.num_new_tokens
            if self.config.enable_prefix_caching:
                self._hashes(seq)
                for k in range(s.start // bs, seq.num_computed_tokens // bs):
                    self.kv.register(seq.block_ids[k], seq.block_hashes[k])
            if s.sample:
                if seq.seq_id not in sampled:
                    raise ValueError(f"no sampled token for {seq.seq_id}, which sampled this step")
                seq.token_ids.append(sampled[seq.seq_id])
                if self._check_stop(seq):
                    self.running.remove(seq)
                    finished.append(seq)
                elif bonus and seq.seq_id in bonus and s.lookahead:
                    for n, token in enumerate(bonus[seq.seq_id], 1):
                        self._take_bonus(seq, token)
                        output.bonus_applied[seq.seq_id] = n
                        if self._check_stop(seq):
                            self.running.remove(seq)
                            finished.append(seq)
                            break
        return finished

    def _take_bonus(self, seq: Sequence, token: int) -> None:
        """An accepted draft (== the token last appended) was computed in the step: count it,
        register the block it may fill, and append the token sampled after it."""
        bs = self.config.block_size
        seq.num_computed_tokens += 1
        if self.config.enable_prefix_caching and seq.num_computed_tokens % bs == 0:
            k = seq.num_computed_tokens // bs - 1
            self.kv.register(seq.block_ids[k], self._hashes(seq)[k])
        seq.token_ids.append(token)

    # ---- internals ----

    def _lookahead(self, seq: Sequence, n: int, budget: int) -> int:
        """Positions past its token a decode step of seq gets (speculative decoding's drafts, or
        the further steps of multi-step decoding), within the budget, max_model_len and the
        tokens max_tokens leaves after the one this step samples."""
        la = self.config.num_lookahead_tokens
        if not la or n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens:
            return 0
        la = min(la, budget - 1, self.config.max_model_len - seq.num_tokens)
        if seq.params.max_tokens is not None:
            la = min(la, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(0, la)

    def _chunk(self, seq: Sequence, start: int, budget: int, grant: int | None = None) -> int:
        """Tokens of seq from `start` this step: within the budget, max_chunk_tokens, the step's
        prefill allowance for prompt chunks (`_prefill_left`; `grant`: this many of its own
        instead, a short prompt's share: _short_grants) and the encoder budget."""
        if grant is not None:
            shared, self._prefill_left = self._prefill_left, grant
            n = self._chunk(seq, start, budget)
            self._prefill_left = shared
            return n
        left = seq.num_tokens - start
        n = min(left, budget)
        n = min(n, self.config.max_chunk_tokens) if self.config.max_chunk_tokens else n
        if left > 1 and n > self._prefill_left:  # a prompt chunk past the step's prefill cap
            n = self._prefill_left
            on_grid = (start + n) // PREFILL_GRID * PREFILL_GRID - start
            # off the grid only where nothing else prefills (a cap below the grid's step)
            n = on_grid if on_grid > 0 else (0 if self._prefill_taken else n)
        n = self._encoder_fit(seq, start, n)[0] if seq.mm_items else n
        if left > 1:
            self._prefill_left -= n
            self._prefill_taken |= n > 0
        return n

    def _has_seat(self) -> bool:
        return len(self.running) < self.config.max_num_seqs and self.state.num_free_slots > 0

    def _admit(self, seq: Sequence, budget: int, out: SchedulerOutput,
               grant: int | None = None) -> int:  # fmt: skip
        """Start waiting `seq` with a chunk of at most `budget` tokens after its cached prefix
        (and of its `grant`, if given: see _chunk) -> the chunk's tokens; 0 (nothing changed)
        where no token fits the step or its KV blocks are not free."""
        cfg, left, taken = self.config, self._prefill_left, self._prefill_taken
        hit_blocks, ckpt = self._lookup(seq)
        hit = len(hit_blocks) * cfg.block_size
        n = self._chunk(seq, hit, budget, grant)
        need = cdiv(hit + n, cfg.block_size) - len(hit_blocks)
        if n == 0 or need > self.kv.num_free_blocks - self.kv.num_evictable_among(hit_blocks):
            self._prefill_left, self._prefill_taken = left, taken
            return 0
        self.waiting.remove(seq)
        self._count_query(seq, hit)
        self.kv.acquire(hit_blocks)
        seq.block_ids = hit_blocks + self.kv.allocate(need)
        seq.num_computed_tokens = hit
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = hit
        seq.state_slot = self.state.allocate_slot()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        restore = self.state.restore(ckpt) if ckpt is not None else None
        seq.restored_from = ckpt
        out.scheduled.append(self._plan(seq, n, restore))
        return n

    def _short_grants(self, allowance: int, grants: dict[str, int]) -> list[Sequence]:
        """Short prompts first (schedule() asks only while a prompt is mid-prefill): of the
        allowance, all but one PREFILL_GRID (what a long prompt keeps) goes to short prompts,
        the fewest tokens first: those started in earlier steps and still mid-prefill, and
        waiting ones (`_short_picks`); the last may get a share on the grid and go on in the
        next steps. Fills `grants` (seq_id -> prompt tokens); -> the waiting ones to admit."""
        room = allowance - PREFILL_GRID
        mid = {s.seq_id for s in self.running if s.num_tokens - s.num_computed_tokens > 1}
        self._short_ids &= mid
        wants = [(s.num_tokens - s.num_computed_tokens, 0, i, s)
                 for i, s in enumerate(self.running) if s.seq_id in self._short_ids]  # fmt: skip
        wants += [(s.num_tokens, 1, i, s) for i, s in enumerate(self._short_picks(room))]
        wants.sort(key=lambda w: w[:3])  # fewest tokens; a started prompt before a new one
        picks = []
        for left, waiting, _, seq in wants:
            g = left if left <= room else room // PREFILL_GRID * PREFILL_GRID
            if g <= 0:
                break
            grants[seq.seq_id] = g
            room -= g
            if waiting:
                picks.append(seq)
        return picks

    def _short_picks(self, room: int) -> list[Sequence]:
        """The waiting prompts (in queue order) that may start this step beside the running
        prompts' chunks: the short ones (whole in `room` prompt tokens, or of up to
        config.short_prompt_tokens), within the free state slots and max_num_seqs. A short
        request then starts now, not after a long prompt's last chunk, also behind waiting
        prompts that are not short: it may pass them (the first of them could not start before
        the running prompts' last chunk anyway) where it leaves that one a seat and the KV
        blocks of its whole prompt after the running prompts' own, so a passed prompt never
        waits for a seat or memory that a later short one took. Under the priority policy only prompts as
        urgent as the passed one pass it."""
        seats = min(self.state.num_free_slots, self.config.max_num_seqs - len(self.running))
        by_priority = self.config.scheduling_policy == "priority"
        rank = (lambda s: s.params.priority) if by_priority else (lambda s: 0)
        bs, picks, passed = self.config.block_size, [], False
        blocks = urgency = 0  # once a prompt is passed: the free KV blocks nobody ahead needs
        for seq in itertools.islice(self.waiting, SHORT_SCAN):
            if len(picks) + passed >= seats or room <= 0:
                break
            need = cdiv(seq.num_tokens, bs)
            if seq.num_tokens > max(room, self.config.short_prompt_tokens):
                if not passed:  # the first that is not short: keep what it will need
                    passed, urgency = True, rank(seq)
                    blocks = self.kv.num_free_blocks - need - sum(
                        max(0, cdiv(s.num_tokens, bs) - len(s.block_ids)) for s in self.running
                    ) - sum(cdiv(s.num_tokens, bs) for s in picks)  # fmt: skip
                continue
            if passed:
                if rank(seq) > urgency:
                    break  # priority policy: never pass a more urgent prompt
                if need > blocks:
                    continue
                blocks -= need
            picks.append(seq)
        return picks

    def _encoder_fit(self, seq: Sequence, start: int, n: int) -> tuple[int, int]:
        """Cut n before the first image / video whose encoding would pass the step's encoder
        budget; -> (n, encoder tokens this chunk starts)."""
        cap = self.config.max_num_encoder_tokens or self.config.max_num_batched_tokens
        used = 0
        for it in seq.mm_items:
            if start <= it.start < start + n:
                if self._encoder_used + used and self._encoder_used + used + it.num_tokens > cap:
                    return it.start - start, used
                used += it.num_tokens
        return n, used

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Blocks for tokens up to num_computed + n; False (nothing taken) if not enough."""
        need = cdiv(seq.num_computed_tokens + n, self.config.block_size) - len(seq.block_ids)
        if need > self.kv.num_free_blocks:
            return False
        seq.block_ids += self.kv.allocate(max(need, 0))
        return True

    def prompt_checkpoints(self, seq: Sequence) -> list[int]:
        """Block boundaries in seq's prompt where its prefill leaves a state checkpoint (besides
        the periodic ones and the branch point): its cache points (`SamplingParams.cache_points`:
        a chat's system prompt and the conversation before this turn, the prefixes the next
        requests share), else the prompt's last block boundary."""
        bs = self.config.block_size
        prompt_end = (seq.num_prompt_tokens - 1) // bs * bs
        if seq.params.cache_points:
            return [min(c // bs * bs, prompt_end) for c in seq.params.cache_points]
        return [prompt_end] if self.config.checkpoint_prompt_end else []

    def prefix_hashes(self, seq: Sequence) -> list[bytes]:
        """The chain hash of every full block of seq's known tokens (extended as they grow)."""
        return self._hashes(seq)

    def _hashes(self, seq: Sequence) -> list[bytes]:
        bs = self.config.block_size
        extra = (lambda k: seq.block_extra_key(k, bs)) if seq.mm_items else None
        return extend_block_hashes(seq.block_hashes, seq.token_ids, bs, seq.cache_salt, extra)

    def _lookup(self, seq: Sequence) -> tuple[list[int], bytes | None]:
        """Longest run of cached full blocks that ends at a state checkpoint and leaves at least
        one token to compute (the logits row to sample from). Where the KV match runs further
        than the checkpoint, remember that branch point: a checkpoint is placed there."""
        if not self.config.enable_prefix_caching or seq.needs_prompt_logprobs:
            return [], None  # (prompt logprobs: every prompt row's logits are needed)
        hashes = self._hashes(seq)
        blocks = self.kv.match_prefix(hashes[: (seq.num_tokens - 1) // self.config.block_size])
        seq.branch_point = len(blocks) * self.config.block_size
        for k in range(len(blocks), 0, -1):
            if self.state.lookup(hashes[k - 1]) is not None:
                return blocks[:k], hashes[k - 1]
        return [], None

    def _plan(self, seq: Sequence, n: int, restore: int | None) -> ScheduledSeq:
        """Schedule n tokens of seq; reserve checkpoints at the block boundaries it crosses."""
        cfg, start = self.config, seq.num_computed_tokens
        if seq.mm_items:
            self._encoder_used += self._encoder_fit(seq, start, n)[1]
        s = ScheduledSeq(seq, start, n, start + n == seq.num_tokens, restore)
        if not self.state.num_checkpoint_slots:
            return s
        iv, bs = cfg.checkpoint_interval, cfg.block_size
        rank = dict.fromkeys(range((start // iv + 1) * iv, start + n + 1, iv), PERIODIC)
        end = KEPT if seq.params.cache_points else PROMPT_END  # (state_cache.py: ranks)
        for t, r in (*((t, end) for t in self.prompt_checkpoints(seq)), (seq.branch_point, KEPT)):
            if start < t <= start + n:
                rank[t] = max(rank.get(t, PERIODIC), r)
        hashes = self._hashes(seq) if rank else []
        # the highest rank first; among periodic ones those at 1, 2, 4, 8... intervals first (where
        # slots are short, the prefixes a later prompt may share keep a checkpoint within half
        # their length: shared prefixes start at token 0), then the deepest: the most recompute saved
        pow2 = lambda t: rank[t] == PERIODIC and (t // iv) & (t // iv - 1) == 0  # noqa: E731
        for t in sorted(rank, key=lambda t: (rank[t], pow2(t), t), reverse=True):
            h = hashes[t // bs - 1]
            if self.state.has_checkpoint(h):
                continue
            slot = self.state.reserve(h, rank[t], own=seq.restored_from)
            if slot is None:  # nothing this rank may evict (nor a lower one)
                break
            s.checkpoints.append((t - start, slot))
        s.checkpoints.sort()
        return s

    def _check_stop(self, seq: Sequence) -> bool:
        p, tok = seq.params, seq.token_ids[-1]
        status, reason = None, None
        # before min_tokens EOS / stop ids are banned, except where a grammar allows nothing
        # else (sampler.apply_min_tokens): such a token ends the output
        if seq.num_output_tokens >= p.min_tokens or p.structured_outputs is not None:
            if not p.ignore_eos and tok in self.config.eos_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
            elif tok in p.stop_token_ids:
                status, reason = SequenceStatus.FINISHED_STOPPED, tok
        if status is None and (
            (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
            or seq.num_tokens >= self.config.max_model_len
        ):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            self._finish(seq, status, reason)
        return status is not None

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq.block_ids)
        seq.block_ids = []
        if seq.state_slot is not None:
            self.state.free_slot(seq.state_slot)
            seq.state_slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq, front=True)

    def _finish(self, seq: Sequence, status: SequenceStatus, stop_reason: int | str | None):
        self._release(seq)
        seq.status, seq.finish_reason = status, FINISH_REASONS[status]
        seq.stop_reason = stop_reason
        del self._seqs[seq.seq_id]

    def _count_query(self, seq: Sequence, hit: int) -> None:
        if self.config.enable_prefix_caching:
            self._stats.queries += 1
            self._stats.hits += hit > 0
            self._stats.query_tokens += seq.num_tokens
            self._stats.hit_tokens += hit

    # ---- stats and checks ----

    def prefix_cache_stats(self) -> PrefixCacheStats:
        st = self._stats
        st.num_cached_blocks, st.block_evictions = self.kv.num_cached_blocks, self.kv.num_evictions
        st.num_checkpoints = self.state.num_checkpoints
        st.checkpoint_capacity = self.state.num_checkpoint_slots
        st.checkpoint_evictions = self.state.num_evictions
        return PrefixCacheStats(**{k: getattr(st, k) for k in st.__dataclass_fields__})

    def reset_prefix_cache(self) -> None:
        """Forget cached blocks and checkpoints (e.g. between benchmark runs)."""
        self.kv.reset_cache()
        self.state.clear_checkpoints()

    def check_integrity(self) -> None:
        """Pools consistent, ref counts == holders, running sequences hold a slot and enough
        blocks, limits respected. Cheap enough to call after every step in tests."""
        self.kv.check_integrity()
        self.state.check_integrity()
        bs, run = self.config.block_size, self.running
        _check(len(run) <= self.config.max_num_seqs, "more running sequences than max_num_seqs")
        _check({s.seq_id for s in run} | {s.seq_id for s in self.waiting} == set(self._seqs), "ids")
        holders = Counter(b for s in run for b in s.block_ids)
        _check(all(self.kv.ref_counts[b] == holders[b] for b in range(self.kv.num_blocks)), "refs")
        _check(all(self.kv.block_hash[b] for b, c in holders.items() if c > 1), "shared, unhashed")
        slots = [s.state_slot for s in run]
        _check(None not in slots and len(set(slots)) == len(slots), "running slots")
        _check(self.state.num_free_slots == self.state.num_slots - len(run), "slots leaked")
        for s in run:
            _check(
                s.status is SequenceStatus.RUNNING and len(set(s.block_ids)) == len(s.block_ids),
                f"{s.seq_id} status or block table",
            )
            _check(
                cdiv(s.num_computed_tokens, bs) <= len(s.block_ids) <= cdiv(s.num_tokens, bs),
                f"{s.seq_id} holds {len(s.block_ids)} blocks for {s.num_computed_tokens} tokens",
            )
            _check(s.num_computed_tokens < s.num_tokens, f"{s.seq_id} has nothing left to compute")
        for s in self.waiting:
            _check(
                s.status is SequenceStatus.WAITING
                and not s.block_ids
                and s.state_slot is None
                and s.num_computed_tokens == 0,
                f"waiting {s.seq_id} holds cache",
            )
