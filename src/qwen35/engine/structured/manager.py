"""Per-sequence grammar state and the per-step token mask.

`StructuredOutputManager` is owned by the engine: `add(seq_id, spec)` gives a sequence its own
matcher, `advance(seq_id, token)` feeds it every accepted token, `apply(logits, seqs)` (called by
the runner between the forward and the sampler) sets the logits of tokens the grammar forbids to
-inf, for constrained rows only. Unconstrained rows are not touched; a batch without constrained
rows costs one dict lookup per row.

Mask: llguidance fills a packed bitmask `[R, ceil(V/32)]` int32 for the R constrained rows (its
executor spreads rows over threads, without the GIL); the engine's EOS ids are then allowed only
where the grammar accepts (a checkpoint's EOS may be an ordinary text token). On a CPU numpy
unpacks the bitmask into a `[R, V]` boolean in one pass; on a GPU it travels to the logits' device
and is unpacked there.

Thinking: with `after_think` the row is free until the first `</think>`. Preemption needs
nothing here: the engine recomputes a preempted sequence's tokens without sampling them again,
so the matcher, advanced once per accepted token, is already exact.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from qwen35.engine.structured.compiler import GrammarCompiler, StructuredOutputError
from qwen35.request import StructuredOutputs

log = logging.getLogger("qwen35")


_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)


@dataclass(slots=True)
class _Constraint:
    matcher: llguidance.LLMatcher
    before_think_end: bool  # after_think and no </think> yet: the row is unconstrained
    failed: bool = False


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits: [R, V] in place; bitmask: [R, ceil(V/32)] int32 (CPU), bit j of word w allows
    token 32w+j. On a CPU numpy unpacks the bits in one pass; elsewhere the words travel to the
    logits' device and are unpacked there (`apply_token_bitmask_torch`)."""
    if logits.device.type != "cpu":
        return apply_token_bitmask_torch(logits, bitmask)
    r, v = logits.shape
    banned = np.unpackbits(~bitmask.numpy().view(np.uint8), axis=1, count=v, bitorder="little")
    logits.masked_fill_(torch.from_numpy(banned).view(torch.bool), float("-inf"))  # [R, V]


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The same with torch ops only, on the logits' device."""
    assert sys.byteorder == "little"  # the uint8 view below reads the words' bytes in order
    r, v = logits.shape
    b = bitmask.to(logits.device, non_blocking=True).view(torch.uint8)  # [R, 4W]
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=logits.device)
    banned = (b.unsqueeze(-1) & bits) == 0  # [R, 4W, 8]
    logits.masked_fill_(banned.view(r, -1)[:, :v], float("-inf"))


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain loops: the test oracle of the two above."""
    words = bitmask.tolist()
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not (words[i][t // 32] >> (t % 32)) & 1:
                logits[i, t] = float("-inf")


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        compile_timeout_s: float = 10.0,
    ) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer, vocab_size, timeout_s=compile_timeout_s)
        self.think_end_id: int | None = tokenizer.think_end_id
        self.eos_token_ids = tuple(t for t in eos_token_ids if 0 <= t < vocab_size)
        self._eos_set = frozenset(self.eos_token_ids)
        self._seqs: dict[str, _Constraint] = {}
        self._executor: llguidance.LLExecutor | None = None
        self._bitmask: torch.Tensor | None = None  # [rows, W] int32, grown on demand
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long)
        self._eos_words = eos // 32  # [E]
        self._eos_bits = torch.tensor(  # [E] int32 (bit 31 wraps to the sign bit)
            [((1 << (t % 32)) + 2**31) % 2**32 - 2**31 for t in self.eos_token_ids],
            dtype=torch.int32,
        )

    # ---- requests -----------------------------------------------------------------------
    def prepare(self, spec: StructuredOutputs) -> concurrent.futures.Future:
        """Start compiling (off the caller's thread); the server awaits this before adding."""
        return self.compiler.submit(spec)

    def compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """The compiled template (cached; raises StructuredOutputError)."""
        return self.compiler.get(spec)

    def add(self, seq_id: str, spec: StructuredOutputs) -> None:
        template = self.compiler.get(spec)
        waiting = spec.after_think and self.think_end_id is not None
        self._seqs[seq_id] = _Constraint(template.deep_copy(), waiting)

    def remove(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def advance(self, seq_id: str, token: int) -> None:
        c = self._seqs.get(seq_id)
        if c is None or c.failed:
            return
        if c.before_think_end:
            c.before_think_end = token != self.think_end_id
            return
        if token in self._eos_set:
            return  # the sequence ends here (only reachable where the grammar accepts)
        if not c.matcher.consume_token(token):
            # cannot happen while the mask is applied; stop constraining rather than fail
            log.warning("structured output of %s left its grammar: %s", seq_id,
                        c.matcher.get_error())  # fmt: skip
            c.failed = True

    def drafts(self, seq_id: str, proposed: Sequence[int], k: int) -> list[int] | None:
        """Speculative drafts (n-gram, engine/speculative.py) for the sequence's next positions
        under its grammar, whose matcher has consumed every token so far: the longest prefix of
        `proposed` the grammar accepts (up to an end-of-sequence id), else up to k tokens the
        grammar forces from here (llguidance's fast-forward tokens: jump-forward decoding as
        drafts, which the model verifies). None where the sequence is not constrained now."""
        c = self._seqs.get(seq_id)
        if c is None or c.failed or c.before_think_end:
            return None
        toks = list(proposed)
        for j, t in enumerate(toks):
            if t in self._eos_set:
                del toks[j:]
                break
        if toks:
            toks = toks[: c.matcher.validate_tokens(toks)]
        return toks or list(c.matcher.compute_ff_tokens())[:k]

    # ---- the step -----------------------------------------------------------------------
    def apply(
        self, logits: torch.Tensor, seqs: Sequence[Any], drafted: Sequence[Sequence[int]] | None = None,
        allowed: dict[int, int] | None = None,
    ) -> dict[int, Exception]:  # fmt: skip
        """logits: [S, V] float, one row per sequence in `seqs`; masked in place. Returns the
        rows the grammar leaves no token (row -> why): they must not be sampled (an all -inf
        row's argmax is token 0, outside the grammar); the engine fails their requests.
        drafted: speculative decoding's bonus rows, each after its sequence's accepted drafts
        (tokens sampled under the mask before them, not yet advanced over): each row's mask is
        the grammar's after them (a copy of its matcher consumes them). allowed: filled with
        each masked row's number of tokens its mask allows (the runner's screened rows)."""
        if not self._seqs:
            return {}
        rows: list[int] = []
        matchers: list[llguidance.LLMatcher] = []
        for i, seq in enumerate(seqs):
            c = self._seqs.get(seq.seq_id)
            if c is None or c.failed:
                continue
            toks = self._over(c, drafted[i] if drafted is not None else ())
            if toks is None:  # (still thinking)
                continue
            m = c.matcher
            if toks:  # a copy advanced over them (the live matcher advances in advance())
                m = m.deep_copy()
                if m.try_consume_tokens(toks) < len(toks):  # (cannot happen: each was sampled
                    continue  # under the mask)
            rows.append(i)
            matchers.append(m)
        if not rows:
            return {}
        return self._mask(logits, seqs, rows, matchers, drafted is not None, allowed)

    def _over(self, c: _Constraint, drafted: Sequence[int]) -> list[int] | None:
        """The tokens of `drafted` the grammar consumes, by advance()'s rules (an end-of-sequence
        id is not consumed: the sequence ends there, or goes on under ignore_eos with the grammar
        where it was); None: the row after them is not constrained (still thinking)."""
        before, toks = c.before_think_end, []
        for t in drafted:
            if before:
                before = t != self.think_end_id
            elif t not in self._eos_set:
                toks.append(t)
        return None if before else toks

    def _mask(self, logits, seqs, rows, matchers, bonus: bool, allowed=None) -> dict[int, Exception]:
        r = len(rows)
        mask = self._mask_buffer(r)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        w = mask.shape[1]
        self._executor.unsafe_compute_mask_ptr(
            [(m, k) for k, m in enumerate(matchers)], mask.data_ptr(), w * 4, r
        )
        eos_allowed = None  # [R, E] the EOS ids the grammar allows as text, before the ban
        if self.eos_token_ids:  # EOS only where the grammar accepts
            eos_allowed = (mask[:, self._eos_words] & self._eos_bits) != 0
            accepting = torch.tensor([m.is_accepting() for m in matchers])  # [R]
            for word, bit in zip(self._eos_words.tolist(), self._eos_bits.tolist(), strict=True):
                col = mask[:, word]  # [R]
                mask[:, word] = torch.where(accepting, col | bit, col & ~bit)
        if allowed is not None:  # set bits a row (the mask's words past the vocabulary are 0)
            bits = _POPCOUNT[mask.view(torch.uint8).long()].sum(dim=1).tolist()
            allowed.update(zip(rows, bits, strict=True))
        dead: dict[int, Exception] = {}
        for k in (mask == 0).all(dim=1).nonzero().flatten().tolist():
            c = self._seqs[seqs[rows[k]].seq_id]
            c.failed = c.failed or not bonus  # (a bonus row: the next step's own row fails)
            if eos_allowed is not None and eos_allowed[k].any():  # it allowed only EOS ids
                why = (f"the grammar's next token here is one of this model's end-of-sequence ids "
                       f"{list(self.eos_token_ids)}, which would end the output before the "
                       "grammar is complete (the checkpoint's EOS id is an ordinary text token)")  # fmt: skip
            else:
                why = f"the grammar allows no token here ({matchers[k].get_error() or 'no error'})"
            dead[rows[k]] = StructuredOutputError(f"structured output cannot continue: {why}")
        v = logits.shape[1]
        if r == logits.shape[0]:
            apply_token_bitmask(logits[:, : self.vocab_size], mask)
        else:
            idx = torch.tensor(rows, device=logits.device)
            sub = logits.index_select(0, idx)  # [R, V]
            apply_token_bitmask(sub[:, : self.vocab_size], mask)
            logits.index_copy_(0, idx, sub)
        if v > self.vocab_size:  # logits wider than the vocabulary: the extra ids never fit
            logits[rows, self.vocab_size :] = float("-inf")
        return dead

    def _mask_buffer(self, rows: int) -> torch.Tensor:
        w = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = torch.empty(max(rows, 8), w, dtype=torch.int32)
        return self._bitmask[:rows]

    def shutdown(self) -> None:
        self.compiler.shutdown()
