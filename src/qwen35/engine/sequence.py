"""Per-sequence state the scheduler tracks: tokens, how many are computed, which cache it holds.

A sequence's `num_computed_tokens` catches up with `num_tokens` (prompt + generated) one chunk
at a time; the token at index `num_computed_tokens` is the next one the model must process.
After a preemption (recompute policy) `num_computed_tokens` drops back to 0 (or to a prefix-cache
hit) and the generated tokens are recomputed with the prompt. No torch here.
"""

from __future__ import annotations

import enum
import itertools
from collections import abc
from dataclasses import dataclass, field

from qwen35.request import SamplingParams


class TokenTail(abc.Sequence):
    """ids[start:] + extra, read-only, without copying ids (its length in O(1)): a sequence's
    output tokens as the sampler reads them each step (only penalties iterate over them)."""

    __slots__ = ("_ids", "_start", "_extra")

    def __init__(self, ids: list[int], start: int, extra: abc.Sequence[int] = ()):
        self._ids, self._start, self._extra = ids, start, tuple(extra)

    def __len__(self) -> int:
        return len(self._ids) - self._start + len(self._extra)

    def __iter__(self):
        yield from itertools.islice(self._ids, self._start, None)
        yield from self._extra

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("TokenTail index out of range")
        i %= n
        k = len(self._ids) - self._start
        return self._ids[self._start + i] if i < k else self._extra[i - k]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"  # eos, stop token id or (engine) stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"  # a step failed while it ran (the engine goes on)

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished")


# The OpenAI finish_reason of each finished status.
FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True)
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt + generated so far
    params: SamplingParams = field(default_factory=SamplingParams)
    # Mixed into the first block hash: requests whose token ids are equal but whose inputs are
    # not (e.g. different images behind the same placeholder tokens) must use different salts.
    cache_salt: str | None = None
    num_prompt_tokens: int = -1  # set from token_ids when left at -1
    num_computed_tokens: int = 0  # tokens whose KV and DeltaNet state are in the caches
    block_ids: list[int] = field(default_factory=list)  # KV block table, block k = tokens k*bs..
    state_slot: int | None = None  # running DeltaNet state slot while RUNNING
    status: SequenceStatus = SequenceStatus.WAITING
    arrival: int = -1  # admission order stamp, set by Scheduler.add
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id (or stop string) that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    # Chain hash of every full block of known tokens (prefix caching); extended lazily.
    block_hashes: list[bytes] = field(default_factory=list)
    # Tokens of the KV prefix match at the last admission; a state checkpoint goes there.
    branch_point: int = 0
    # The state checkpoint it resumed from at its last admission (block hash), which its own
    # deeper checkpoints may take the place of (state_cache.StatePool.reserve `own`)
    restored_from: bytes | None = None
    # Images / videos (multimodal.inputs.MMItem: token segments, content hash, pixels), their
    # 3-D rotary positions over the prompt ([3, num_prompt_tokens]) and the decode offset.
    mm_items: list = field(default_factory=list)
    mrope: object = None
    rope_delta: int = 0
    # SamplingParams.prompt_logprobs: the TokenLogprob of prompt token k + 1 at index k, as the
    # prompt's chunks are computed (None: this sequence does not compute them; of a request's n
    # sequences only the first does)
    prompt_logprobs: list | None = None
    # the LoRA adapter it runs with (engine/lora_adapters.py id; its cache_salt keys the prefix
    # cache by it); 0: the base model
    lora_id: int = 0
    # --prefix-cache-dir: its files were looked up before its first admission
    disk_checked: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: its prompt must run from the start (no prefix hit)."""
        return self.prompt_logprobs is not None and (
            len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def block_extra_key(self, k: int, block_size: int) -> bytes:
        """What besides its tokens block k depends on: the content hash (and first token) of
        every image / video with tokens in it, so a different image never matches."""
        lo, hi = k * block_size, (k + 1) * block_size
        return b"".join(
            it.content_hash + it.start.to_bytes(8, "little")
            for it in self.mm_items
            if it.start < hi and it.end > lo
        )
