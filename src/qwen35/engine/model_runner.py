"""Runs one scheduled step: builds the ForwardBatch, runs the model over the paged caches, samples.

The runner holds the cache tensors (the engine allocates them from `cache_spec` with
`forward_batch.allocate_caches` and hands them over), the backend (ops/backend.py, chosen once
here), the decode CUDA graphs (engine/cuda_graphs.py, on a GPU unless --enforce-eager) and the
per-sequence random generators; it knows nothing of text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from qwen35.engine.cuda_graphs import DecodeGraphs
from qwen35.engine.forward_batch import ForwardBatch, ModelCaches
from qwen35.engine.sampler import (
    Sampler,
    SamplingRow,
    argmax,
    has_penalties,
    is_greedy,
    make_generator,
    sample_isolated,
)
from qwen35.engine.sequence import TokenTail
from qwen35.engine.speculative import GPU_MAX_VERIFY_SEQS, Draft, SpecState, Verify
from qwen35.engine.vision_inputs import VisionInputs
from qwen35.kernels.unavailable import KernelUnavailable
from qwen35.ops.backend import Backend, select_backend
from qwen35.request import TokenLogprob

log = logging.getLogger("qwen35")

# prompt logprobs: head rows at a time (their fp32 logits and log_softmax: 2 x 64 MB at a
# vocabulary of 248K), so a long prompt chunk never holds the whole chunk's logits
PROMPT_LOGPROB_ROWS = 64


@dataclass(frozen=True)
class GraphSpec:
    """Decode CUDA graphs: capture batches up to max_batch. The caches' LAST block and LAST
    state slot are padding (allocate one more of each; the scheduler never hands them out)."""

    max_batch: int
    max_model_len: int


@dataclass
class StepResult:
    sampled: dict[str, int]  # seq_id -> next token
    logprobs: dict[str, TokenLogprob]  # seq_id -> logprob info (only where asked)
    errors: dict[str, Exception] = field(default_factory=dict)  # seq_id -> why sampling failed
    # speculative decoding: seq_id -> the tokens sampled after its accepted drafts (the first
    # draft == its sampled token, each later one == the bonus token before it)
    bonus: dict[str, list[int]] = field(default_factory=dict)
    # and the logprob info of each bonus token (SamplingParams.logprobs), in the same order
    bonus_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # speculative decoding with SpecState.adaptive: the rows of a pure decode step (drafts
    # included), which the engine times as a whole step into SpecState.cost; None otherwise
    decode_rows: int | None = None
    # SamplingParams.prompt_logprobs: seq_id -> those of the prompt positions this step ran
    # (in order, continuing the sequence's prompt_logprobs)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        caches: ModelCaches,
        eos_token_ids: tuple[int, ...],
        device: torch.device | str = "cpu",
        backend: Backend | None = None,
        decode_graphs: GraphSpec | None = None,
        seed: int | None = None,  # the sampler's shared generator (unseeded requests)
        head_screen=None,  # models/head_screen.py HeadScreen: greedy / top-k rows skip the head
        spec_slots: range | None = None,  # speculative decoding (MTP drafts): spare state slots
        spec_tokens: int = 1,  # drafts per step at most
        spec_adaptive: bool = False,  # fewer where they do not pay (SpecState.adaptive)
        spec_ngram: tuple[int, int] | None = None,  # n-gram drafts (min, max n), not the MTP head
        decode_steps: int = 1,  # multi-step decoding (EngineConfig num_scheduler_steps)
    ):
        self.model = model
        self.caches = caches
        self.device = torch.device(device)
        # chosen once per engine (compiles the CPU kernel now, not in the first decode step)
        self.backend = backend or select_backend(self.device, dtype=_dtype_of(model))
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampler = Sampler(seed=seed)
        self.head_screen = head_screen
        # back-off after undecided screens (the full head then ran too): per kind of step
        # (greedy-only, or with top-k rows), skip the screen for 2^misses steps, up to 64
        self._screen_misses = {"greedy": 0, "top-k": 0, "grammar": 0}
        self._screen_skip = {"greedy": 0, "top-k": 0, "grammar": 0}
        self._screen_hits = {"greedy": 0, "top-k": 0, "grammar": 0}  # decided in a row
        # fn(logits [S, V], sequences) masking rows in place before sampling (structured outputs)
        self.logits_processor = None
        self._generators: dict[str, torch.Generator | None] = {}
        self._tables: dict[str, tuple[list[int], np.ndarray, int]] = {}  # _table_row
        self.vision = (
            VisionInputs(model, self.device) if getattr(model, "has_vision", False) else None
        )
        self.decode_steps = decode_steps
        self.spec: SpecState | None = None  # engine/speculative.py
        self._graphed = False  # the step's forward replayed from a graph (its MTP pass can)
        if spec_slots is not None:
            if spec_ngram is None and not getattr(model, "has_mtp", False):
                raise ValueError("speculative decoding needs a model loaded with its MTP head")
            self.spec = SpecState(spec_slots, k=spec_tokens, adaptive=spec_adaptive,
                                  max_rows=_verify_rows(model, device), ngram=spec_ngram)  # fmt: skip
            if self.backend.device_type != "cpu":
                self.spec.max_verify_seqs = GPU_MAX_VERIFY_SEQS
        self.graphs: DecodeGraphs | None = None
        if decode_graphs is not None:
            self.graphs = self._capture(decode_graphs)

    def _capture(self, spec: GraphSpec) -> DecodeGraphs | None:
        """Decode CUDA graphs where the backend allows them (else None: eager steps)."""
        from qwen35.layers.moe import Experts

        be = self.backend
        if not be.can_capture:
            log.warning("decode runs without CUDA graphs: backend %s cannot capture a step "
                        "(needs Triton attention)", be.name)  # fmt: skip
            return None
        max_batch, max_rows = spec.max_batch, None
        experts = [m for m in self.model.modules() if isinstance(m, Experts)]
        if experts and not (be.grouped_mm and all(m.grouped for m in experts)):
            # no grouped GEMM for these experts (quantized ones run one expert at a time from
            # counts read on the host): graphs for the batches the Triton MoE takes, if any
            rows = min(m.few_token_graphs(be) for m in experts)
            if not rows:
                log.warning("decode runs without CUDA graphs: the MoE experts sync the host "
                            "(backend %s)", be.name)  # fmt: skip
                return None
            max_rows = rows  # (verify steps: sequences x rows each)
            if max_batch > rows:
                log.info("decode CUDA graphs up to %d rows (the MoE kernels' limit); larger "
                         "decode batches run eagerly", rows)  # fmt: skip
                max_batch = rows
        c = self.caches
        verify = {}
        if self.spec is not None:  # hidden rows out; verify steps of k + 1 rows a sequence
            seqs = min(self.spec.max_verify_seqs, max_batch)
            mtp = self.spec.ngram is None and getattr(self.model, "has_mtp", False)
            verify = dict(verify_rows=self.spec.k + 1, verify_seqs=seqs, max_rows=max_rows,
                          mtp=mtp)  # fmt: skip
        graphs = DecodeGraphs(
            self.model, c, be, max_batch, -(-spec.max_model_len // c.block_size),
            pad_block=c.num_blocks - 1, pad_slot=c.num_slots - 1, **verify,
        )  # fmt: skip
        try:
            graphs.capture()
        except Exception as e:  # a kernel that syncs or allocates on the host: run eagerly
            if isinstance(e, KernelUnavailable):  # one the start-up check did not meet
                self.backend = be.without(e)  # eager steps without it
            else:
                log.warning("CUDA graph capture failed (%s); decode runs eagerly", str(e)[:300])
            if self.device.type == "cuda":  # torch.cuda.graph leaves its capture stream current
                torch.cuda.set_stream(torch.cuda.default_stream(self.device))  # when it raises
            return None
        return graphs

    # ---- per-sequence sampling state ------------------------------------------------------
    def add_sequence(self, seq_id: str, seed: int | None) -> None:
        self._generators[seq_id] = make_generator(seed, self.device)

    def remove_sequence(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)
        self._tables.pop(seq_id, None)
        if self.spec is not None:
            self.spec.remove(seq_id)
        if self.vision is not None:
            self.vision.drop(seq_id)

    # ---- one step -----------------------------------------------------------------------
    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        """Copy DeltaNet conv + recurrent state between slots (prefix-cache restore)."""
        for conv, rec in zip(self.caches.conv, self.caches.recurrent, strict=True):
            conv[dst_slot].copy_(conv[src_slot])
            rec[dst_slot].copy_(rec[src_slot])

    def _table_row(self, seq) -> np.ndarray:
        """seq.block_ids as a host int32 array, kept per sequence and extended by the blocks
        added since the last step (converting every block id of every sequence each step cost
        O(context): ~2.6 ms a step at 32 sequences of 4K tokens); rebuilt when the scheduler
        replaced the list (admission, preemption)."""
        ids = seq.block_ids
        kept = self._tables.get(seq.seq_id)
        if kept is None or kept[0] is not ids or kept[2] > len(ids):
            buf = np.zeros(max(16, 2 * len(ids)), dtype=np.int32)
            buf[: len(ids)] = ids
        else:
            _, buf, n = kept
            if len(ids) > len(buf):
                buf = np.concatenate([buf[:n], np.zeros(2 * len(ids) - n, dtype=np.int32)])
            if len(ids) > n:
                buf[n : len(ids)] = ids[n:]
        self._tables[seq.seq_id] = (ids, buf, len(ids))
        return buf[: len(ids)]

    def build_batch(
        self,
        scheduled,
        verify: dict[int, Verify] | None = None,
        phased: bool = False,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ForwardBatch, list]:
        """The step's host lists -> input ids [T] and the ForwardBatch (all index tensors built
        here, so the model reads nothing back from the device). verify: scheduled index ->
        drafts run after its last token, rows whose DeltaNet steps follow the state after the
        row before, each of which is saved into a spare slot: as one chunk with state
        checkpoints, or (phased: a step of one token per sequence) as decode rows after all the
        others, the j-th drafts in phase j (DecodeBatch.phases: each row's arithmetic that of a
        decode step). `self.rows_of`: each scheduled sequence's token rows; `self.sample_rows`:
        the sampled ones. input_ids: the step's token ids already on the device (multi-step
        decoding: the tokens the step before sampled, one a sequence; they are not in
        seq.token_ids yet)."""
        verify = verify or {}
        bs = self.caches.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        state_slots: list[int] = []
        has_init: list[bool] = []
        logits_rows: list[int] = []
        sample_seqs = []
        checkpoints: list[tuple[int, int, int]] = []
        depth = max((len(v.drafts) for v in verify.values()), default=0) if phased else 0
        copies: list[list[tuple[int, int]]] = [[] for _ in range(depth)]  # after each phase

        lora_rows: dict[int, list[int]] = {}  # adapter id -> its rows

        def add(seq, start: int, toks: list[int]) -> None:
            end = start + len(toks)
            if seq.lora_id:
                lora_rows.setdefault(seq.lora_id, []).extend(range(len(ids), len(ids) + len(toks)))
            ids.extend(toks)
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + len(toks))
            context_lens.append(end)
            tables.append(self._table_row(seq))
            state_slots.append(seq.state_slot)
            has_init.append(start > 0)

        self.rows_of = []
        self.sample_rows = logits_rows  # (the same on the host: no read back from the device)
        for i, s in enumerate(scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            v = verify.get(i)
            toks = seq.token_ids[start : start + n] if input_ids is None else [0] * n
            ck = list(s.checkpoints)
            if v is not None and phased:  # the draft rows come after every sequence's token
                for j, spare in enumerate(v.spares[: len(v.drafts)]):
                    copies[j].append((seq.state_slot, spare))
                copies[0] += [(seq.state_slot, dest) for off, dest in ck if dest != v.spares[0]]
                ck = []
            elif v is not None:
                toks = toks + v.drafts
                ck += [(j + 1, x) for j, x in enumerate(v.spares[: len(v.drafts)])
                       if (j + 1, x) not in ck]  # fmt: skip
            add(seq, start, toks)
            self.rows_of.append(list(range(cu[-2], cu[-1])))
            if s.sample:
                logits_rows.append(cu[-2] + n - 1)
                sample_seqs.append(seq)
            checkpoints.extend((i, off, dest) for off, dest in ck)
        splits = []
        for j in range(depth):  # phase j + 1: the (j+1)-th drafts
            splits.append(cu[-1])
            for i, v in verify.items():
                if j < len(v.drafts):
                    s = scheduled[i]
                    add(s.seq, s.start + 1 + j, [v.drafts[j]])
                    self.rows_of[i].append(cu[-1] - 1)
        batch = ForwardBatch.build(
            positions=positions,
            cu_seqlens=cu,
            context_lens=context_lens,
            slot_mapping=slots,
            block_tables=tables,
            state_slots=state_slots,
            has_initial_state=has_init,
            logits_indices=logits_rows,
            state_checkpoints=checkpoints,
            device=self.device,
            backend=self.backend,
            # sent with the other index tensors (one copy per dtype on a GPU)
            input_ids=ids if input_ids is None else input_ids,
            phase_splits=splits,
            phase_copies=copies,  # (after each phase but the last)
        )
        if lora_rows:
            if self.model.lora_step.stacked:  # each row's slot (layers/lora.py LoraSlots)
                slot_of = np.zeros(cu[-1], dtype=np.int64)
                for key, rows in lora_rows.items():
                    slot_of[rows] = key
                batch.lora_slots = torch.from_numpy(slot_of).to(self.device)
            else:
                batch.lora = lora_groups(lora_rows, cu[-1], self.device)
        return batch.input_ids, batch, sample_seqs

    def run_model(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The forward pass: a captured CUDA graph where one fits, else eager (tensor
        parallelism overrides this to broadcast the step first, parallel/runner.py)."""
        if (
            self.graphs is not None
            and batch.mrope_positions is None  # graphs read 1-D positions only
            and self.graphs.can_run(batch)
        ):
            logits = self.graphs.run(input_ids, batch)  # [S, V] fp32
            if batch.state_copies:
                self.caches.copy_states(batch.state_copies)
            return logits
        return self.model(input_ids, batch, self.caches)

    # the model calls of a speculative step or one with prompt logprobs (tensor parallelism
    # mirrors each on the other ranks first, parallel/runner.py: they have collectives)
    def forward_hidden(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model.forward_hidden(input_ids, batch, self.caches)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(x)

    def forward_mtp(
        self, next_ids, hidden, batch: ForwardBatch, step: bool, kv_only: bool = False
    ) -> torch.Tensor | None:
        """The MTP head over `hidden`; step: hidden and batch are the step's own (final-norm
        rows of forward_hidden's output), else a chain's (_chain). kv_only: its KV only."""
        return self.model.forward_mtp(next_ids, hidden, batch, self.caches, kv_only)

    def put_back(self, pairs: list[tuple[int, int]]) -> None:
        """Sequences with a rejected draft: (spare, slot) state copies."""
        self.caches.copy_states(pairs)

    @torch.inference_mode()
    def execute(self, scheduled) -> StepResult:
        try:
            return self._execute(scheduled)
        except KernelUnavailable as e:  # a GPU kernel this GPU cannot build, met after start-up
            self.backend = self.backend.without(e)  # (engine/preflight.py): later steps take
            raise  # the PyTorch path; this step's sequences fail (half a step may be written)

    def _execute(self, scheduled) -> StepResult:
        for s in scheduled:
            if s.restore_from is not None:
                self.copy_state(s.restore_from, s.seq.state_slot)
        if not scheduled:
            return StepResult({}, {})
        if self.device.type == "cpu" and all(s.num_new_tokens == 1 for s in scheduled):
            # one token each: rows in state-slot order, so the CPU kernels step the DeltaNet
            # states in place on runs of slots and the decode plan applies (models/
            # cpu_decode.py); each row's arithmetic is the same in any order
            scheduled = sorted(scheduled, key=lambda s: s.seq.state_slot)
        if self.decode_steps > 1 and self.spec is None and (k := self._steps(scheduled)) > 1:
            return self._multi_step(scheduled, k)
        verify = self.spec.plan(scheduled) if self.spec is not None else {}
        if verify and self.spec.k > 1 and self.spec.ngram is None:
            self._chain(scheduled, verify)
        mm = self.vision is not None and any(s.seq.mm_items for s in scheduled)
        phased = bool(verify) and not mm and all(s.num_new_tokens == 1 for s in scheduled)
        input_ids, batch, sample_seqs = self.build_batch(scheduled, verify, phased)
        if mm:  # images: encoder outputs and 3-D positions
            self.vision.apply(_with_drafts(scheduled, verify), batch)
        prompt = self._prompt_rows(scheduled)
        if self.spec is not None:
            result = self._execute_spec(scheduled, verify, input_ids, batch, sample_seqs, prompt)
            if self.spec.adaptive and not batch.prefill and batch.mm_rows is None:
                result.decode_rows = batch.num_tokens  # a pure decode step: the engine times it
            return result
        if prompt:  # every prompt row's logits, not only the sampled rows'
            h = self.forward_hidden(input_ids, batch)
            plps = self._prompt_logprobs(h, prompt)
            logits = None
            if sample_seqs:
                x = self.model.final_norm(h.index_select(0, batch.logits_indices), batch.backend)
                logits = self.head_logits(x)
            result = self._sample(sample_seqs, logits=logits)
            result.prompt_logprobs = plps
            return result
        ks, kind = self._screen_ks(len(batch.logits_indices), sample_seqs)
        if ks is not None:  # every row keeps only its k largest logits (models/head_screen.py)
            h = self.model.forward_hidden(input_ids, batch, self.caches)
            h = h.index_select(0, batch.logits_indices)  # [S, H]
            x = self.model.final_norm(h, batch.backend)
            tokens, logits = self._head(x, ks, kind)
            return self._sample(sample_seqs, tokens, logits,
                                head_input=x if kind == "grammar" else None)  # fmt: skip
        logits = self.run_model(input_ids, batch)  # [S, V] fp32
        return self._sample(sample_seqs, logits=logits)

    def _head(self, x, ks, kind) -> tuple[list[int] | None, torch.Tensor | None]:
        """Head-input rows x [S, H] -> (tokens, None) where every row is greedy and the int8
        screen decides them all, else (None, logits [S, V]): screened (exact where it can
        matter, -inf elsewhere: the sampler's draw is unchanged) or the full head. ks, kind:
        each row's k and the step's kind (_screen_ks), None: the full head."""
        if ks is not None:
            if kind == "greedy":
                tokens = self.head_screen.tokens(x)
                self._screen_outcome(kind, tokens is not None)
                if tokens is not None:
                    return tokens, None
            else:
                logits = self.head_screen.logits(x, ks)
                # (a grammar step's success counts once its rows are checked: _grammar_rows)
                if logits is None or kind != "grammar":
                    self._screen_outcome(kind, logits is not None)
                if logits is not None:
                    return None, logits
        return None, self.head_logits(x)

    def _sample(
        self, seqs, tokens=None, logits=None, drafted: list[int] | None = None, head_input=None
    ) -> StepResult:
        """The next token of each of `seqs`: the screen's greedy `tokens`, or drawn from their
        `logits` [S, V] after the structured-output mask. drafted: speculative bonus rows,
        each after its sequence's accepted drafts (appended to its output for penalties and
        min_tokens; the grammar's mask after them). head_input: the head's input rows [S, H]
        where `logits` may be the int8 screen's (rows under a grammar: _grammar_rows)."""
        if not seqs:
            return StepResult({}, {})
        if tokens is not None:
            return StepResult({s.seq_id: int(t) for s, t in zip(seqs, tokens, strict=True)}, {})
        rows = self._rows(seqs, drafted)
        logits = logits.float()
        dead: dict[int, Exception] = {}  # rows the processor left no token: not sampled
        if self.logits_processor is not None:  # (bonus rows: masked after their drafts)
            if head_input is not None:
                dead = self._grammar_rows(logits, seqs, drafted, head_input)
            else:
                dead = self.logits_processor(logits, seqs, drafted) or {}
            for i in dead:
                logits[i] = 0.0  # (any finite row: its draw is dropped below)
        out, failed = sample_isolated(self.sampler, logits, rows)
        failed = {**failed, **dead}
        for i in dead:
            out.token_ids[i] = None
            out.logprobs[i] = None
        errors = {seqs[i].seq_id: e for i, e in failed.items()}
        sampled = {
            seq.seq_id: int(t) for seq, t in zip(seqs, out.token_ids, strict=True) if t is not None
        }
        lps = {
            seq.seq_id: lp for seq, lp in zip(seqs, out.logprobs, strict=True) if lp is not None
        }
        return StepResult(sampled, lps, errors)

    def _grammar_rows(self, logits, seqs, drafted, head_input) -> dict[int, Exception]:
        """The grammar's mask over logits [S, V] that may be the int8 screen's: a row under a
        grammar that wants its k largest allowed logits (greedy: 1; sampled: its top_k) screens
        its K largest (grammar_ks; models/head_screen.py), every token among which is a
        candidate with its exact logit, so a token outside them is below the K-th largest
        candidate. Where the k-th best token the grammar allows among the candidates reaches
        that, or every token it allows is a candidate, the masked row keeps exactly what the
        full row's mask and top-k keep (ties included): the same token, the same draw. Other
        rows get the full head's logits, masked (and the next such steps skip the screen for
        a while: _screen_outcome)."""
        check = {}  # row -> (its k, the K-th largest of its logits before the mask)
        for i, s in enumerate(seqs):
            if s.params.structured_outputs is not None:
                fin = logits[i][torch.isfinite(logits[i])]
                if len(fin) < logits.shape[1]:  # (screened: -inf outside the candidates)
                    k, K = grammar_ks(s.params)
                    check[i] = (k, fin.topk(min(K, len(fin))).values[-1])
        allowed: dict[int, int] = {}  # row -> tokens its grammar allows (masked rows)
        dead = self.logits_processor(logits, seqs, drafted, allowed=allowed) or {}
        redo = []
        for i, (k, kth) in check.items():
            if i in dead:
                continue
            kept = logits[i][torch.isfinite(logits[i])]  # the allowed candidates
            if not (len(kept) >= k and kept.topk(k).values[-1] >= kth
                    or allowed.get(i) == len(kept)):  # fmt: skip
                redo.append(i)
        if check:
            self._screen_outcome("grammar", not redo)
        if redo:
            idx = torch.tensor(redo, dtype=torch.long, device=logits.device)
            full = self.head_logits(head_input.index_select(0, idx)).float()
            sub = [drafted[i] for i in redo] if drafted is not None else None
            self.logits_processor(full, [seqs[i] for i in redo], sub)
            logits.index_copy_(0, idx, full)
        return dead

    def _rows(self, seqs, drafted: list[int] | None = None) -> list[SamplingRow]:
        """The sampler's row of each sequence (drafted: see _sample)."""
        extra = drafted or [()] * len(seqs)
        return [
            SamplingRow(
                params=seq.params,
                # the prompt is read only by the repetition penalty: skip the copy otherwise
                prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens]
                if seq.params.repetition_penalty != 1.0
                else (),
                output_token_ids=TokenTail(seq.token_ids, seq.num_prompt_tokens, d),
                generator=self._generators.get(seq.seq_id),
                eos_token_ids=() if seq.params.ignore_eos else self.eos_token_ids,
            )
            for seq, d in zip(seqs, extra, strict=True)
        ]

    # ---- multi-step decoding --------------------------------------------------------------
    def _steps(self, scheduled) -> int:
        """How many decode steps this scheduled step can run back to back (1: one, as usual):
        every sequence decodes one token with lookahead positions (the scheduler's
        num_lookahead_tokens), its sampling needs nothing from the host (`device_sampled`), no
        images (3-D positions); 1 + the fewest lookahead positions of them."""
        k = self.decode_steps
        for s in scheduled:
            seq = s.seq
            if s.num_new_tokens != 1 or not s.sample or seq.mm_items or seq.needs_prompt_logprobs:
                return 1
            p, n = seq.params, seq.num_output_tokens
            if not device_sampled(p, n):
                return 1
            k = min(k, 1 + s.lookahead)
            if p.think_end_token_id is not None and n < p.thinking_token_budget:
                k = min(k, p.thinking_token_budget - n)  # (the budget's position: one step)
        return k

    def _multi_step(self, scheduled, k: int) -> StepResult:
        """k decode steps of the scheduled sequences back to back, each fed the tokens the one
        before sampled, on the device: one read of the tokens at the end (k per sequence: the
        first as the step's sampled token, the rest as bonus tokens, which the scheduler takes
        as speculative decoding's accepted drafts: stops checked after each, the KV of those
        after a stop never read). Positions start + j; the scheduler gave every sequence KV
        blocks up to start + k - 1 (its lookahead)."""
        seqs = [s.seq for s in scheduled]
        rows = self._rows(seqs)
        input_ids, batch, _ = self.build_batch(scheduled)
        out = []
        for j in range(k):
            if j:
                later = [dataclasses.replace(s, start=s.start + j, restore_from=None, checkpoints=[])
                         for s in scheduled]  # fmt: skip
                input_ids, batch, _ = self.build_batch(later, input_ids=out[-1])
            logits = self.run_model(input_ids, batch)  # [S, V]
            out.append(self.sampler.tokens(logits, rows))
        tokens = torch.stack(out, dim=1).tolist()  # [S, k]: the one host read
        return StepResult(
            {seq.seq_id: t[0] for seq, t in zip(seqs, tokens, strict=True)}, {},
            bonus={seq.seq_id: t[1:] for seq, t in zip(seqs, tokens, strict=True)},
        )  # fmt: skip

    def _prompt_rows(self, scheduled) -> list[tuple[str, list[int], list[int], int]]:
        """Rows whose logits give prompt logprobs this step: (seq_id, token rows, the prompt
        tokens they predict, top-n) per sequence that still needs some (`self.rows_of` after
        build_batch: row j of a sequence is its position start + j)."""
        want = []
        for i, s in enumerate(scheduled):
            seq = s.seq
            if not seq.needs_prompt_logprobs:
                continue
            lo = max(s.start, len(seq.prompt_logprobs))  # (recomputed after a preemption: kept)
            hi = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if lo < hi:
                rows = self.rows_of[i][lo - s.start : hi - s.start]
                want.append((seq.seq_id, rows, seq.token_ids[lo + 1 : hi + 1],
                             seq.params.prompt_logprobs))  # fmt: skip
        return want

    def _prompt_logprobs(self, h: torch.Tensor, want) -> dict[str, list[TokenLogprob]]:
        """log_softmax of the raw logits at each wanted row (a few rows at a time: the
        vocabulary is wide): the next prompt token's logprob and rank, and the top-n."""
        out: dict[str, list[TokenLogprob]] = {}
        for seq_id, rows, targets, n in want:
            lps = out.setdefault(seq_id, [])
            for a in range(0, len(rows), PROMPT_LOGPROB_ROWS):
                idx = torch.tensor(rows[a : a + PROMPT_LOGPROB_ROWS], device=h.device)
                tok = torch.tensor(targets[a : a + PROMPT_LOGPROB_ROWS], device=h.device)
                x = self.model.final_norm(h.index_select(0, idx), self.backend)
                lp = torch.log_softmax(self.head_logits(x).float(), dim=-1)
                chosen = lp.gather(1, tok[:, None])
                rank = (lp > chosen).sum(dim=1) + 1
                top_v, top_i = lp.topk(n, dim=-1) if n else (lp[:, :0], tok[:, None][:, :0])
                for t, c, r, tv, ti in zip(targets[a : a + PROMPT_LOGPROB_ROWS],
                                           chosen[:, 0].tolist(), rank.tolist(),
                                           top_v.tolist(), top_i.tolist(), strict=True):  # fmt: skip
                    lps.append(TokenLogprob(t, c, dict(zip(ti, tv, strict=True)), rank=r))
        return out

    def _execute_spec(
        self, scheduled, verify, input_ids, batch, sample_seqs, prompt=()
    ) -> StepResult:
        """engine/speculative.py: the head over the first rows and the draft rows at once (one
        read of it), the first rows sampled, then each accepted draft's row in turn (a draft
        is accepted when it equals the token sampled before it), the states of sequences with
        a rejected draft put back to the one after their last accepted row; then the next
        drafts."""
        spec, be, rows_of = self.spec, batch.backend, self.rows_of
        self._graphed = False  # (set by _graph_hidden when this step replays)
        x = self._graph_hidden(input_ids, batch, rows_of) if not prompt else None
        plps = {}
        if x is None:
            h = self.forward_hidden(input_ids, batch)  # [T, H]
            plps = self._prompt_logprobs(h, prompt) if prompt else {}
            x = self.model.final_norm(h, be)  # every row: the MTP head reads them all
        S = len(sample_seqs)
        extra = [(i, j) for i in verify for j in range(1, len(rows_of[i]))]  # draft j's row
        rows = self.sample_rows + [rows_of[i][j] for i, j in extra]
        seqs = sample_seqs + [scheduled[i].seq for i, _ in extra]
        shifts = [0] * S + [j for _, j in extra]
        ks, kind = self._screen_ks(len(seqs), seqs, shifts=shifts)
        tokens, logits = None, None
        xr = None  # the head's input rows where grammar rows may have the screen's logits
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=x.device)
            xs = x.index_select(0, idx)
            tokens, logits = self._head(xs, ks, kind)
            xr = xs if kind == "grammar" else None
            if tokens is None and extra and all(k == 1 for k in _row_ks(seqs, shifts)):
                tokens = _greedy_tokens(logits)  # every row at once: one read, not one a draft
        at = {ij: S + n for n, ij in enumerate(extra)}

        def part(idx: list[int]):  # the head's output for some of the rows
            if tokens is not None:
                return {"tokens": [tokens[j] for j in idx]}
            return {"logits": None if logits is None else logits[idx],
                    "head_input": None if xr is None else xr[idx]}  # fmt: skip

        result = self._sample(sample_seqs, **part(list(range(S))))
        bonus: dict[int, list[int]] = {}
        alive = [i for i in verify
                 if result.sampled.get(scheduled[i].seq.seq_id) == verify[i].drafts[0]]  # fmt: skip
        j = 1
        while alive:  # the rows after the j-th drafts of sequences that accepted d_1..d_j
            got = self._sample([scheduled[i].seq for i in alive], **part([at[i, j] for i in alive]),
                               drafted=[verify[i].drafts[:j] for i in alive])  # fmt: skip
            nxt = []
            for i in alive:  # (a row whose sampling failed: the tokens before it stand)
                sid = scheduled[i].seq.seq_id
                y = got.sampled.get(sid)
                if y is None:
                    continue
                bonus.setdefault(i, []).append(y)
                if sid in got.logprobs:
                    result.bonus_logprobs.setdefault(sid, []).append(got.logprobs[sid])
                if j < len(verify[i].drafts) and y == verify[i].drafts[j]:
                    nxt.append(i)
            alive, j = nxt, j + 1
        result.bonus = {scheduled[i].seq.seq_id: b for i, b in bonus.items()}
        back = []  # (spare, slot): the state after the last accepted row
        for i, v in verify.items():
            a = len(bonus.get(i, ()))
            spec.outcome(scheduled[i].seq.seq_id, len(v.drafts), a)
            if a < len(v.drafts):
                back.append((v.spares[a], scheduled[i].seq.state_slot))
        if back:
            self.put_back(back)
        if spec.ngram is None:  # (n-gram drafts are looked up when the next step is planned)
            self._draft(scheduled, verify, x, batch, result, rows_of)
        result.prompt_logprobs = plps
        return result

    def _graph_hidden(self, input_ids, batch: ForwardBatch, rows_of) -> torch.Tensor | None:
        """Speculative decoding: the final norm's rows [T, H] of a decode or verify step from a
        CUDA graph where one takes it, else None (the eager forward)."""
        g = self.graphs
        if g is None or batch.mrope_positions is not None:
            return None
        if g.can_run(batch):
            x = g.run(input_ids, batch)
        elif g.can_run_phased(batch, rows_of):
            x = g.run_phased(input_ids, batch, rows_of)
        else:
            return None
        self._graphed = True  # (the MTP head's pass over this step replays too)
        if batch.state_copies:
            self.caches.copy_states(batch.state_copies)
        return x

    def _draft(self, scheduled, verify, x, batch, result: StepResult, rows_of) -> None:
        """Run the MTP head over every row of the step with the token that follows each row,
        and keep a greedy draft for each sampled sequence from its last confirmed row (with
        the head's output row there, which the next step's chain continues from). Eagerly,
        rows no draft reads get only the head layer's K / V (all of them where none drafts;
        a prompt chunk's other rows)."""
        spec = self.spec
        many = len(result.sampled) > spec.max_verify_seqs  # the next step will verify none
        nxt = [0] * x.shape[0]
        draft_rows: list[int] = []
        draft_seqs: list[tuple[str, int]] = []  # (seq_id, draft position)
        at: list[tuple] = []  # (sequence, position) of each draft row
        for i, s in enumerate(scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            known = seq.token_ids[start + 1 : start + n + 1]  # the prompt's next tokens
            y = result.sampled.get(seq.seq_id)
            if len(known) < n:  # the last row's next token is the one sampled now
                known.append(0 if y is None else y)
            a = len(rows_of[i]) - 1  # the last confirmed row
            if i in verify:  # draft j's row: followed by bonus j (garbage after a rejection,
                b = result.bonus.get(seq.seq_id, [])  # overwritten before it is read)
                a = len(b)
                known += b + [0] * (len(verify[i].drafts) - a)
            for r, t in zip(rows_of[i], known, strict=True):
                nxt[r] = t
            if y is None or many or not spec.wants_draft(seq.seq_id):
                spec.forget(seq.seq_id)
                continue
            draft_rows.append(rows_of[i][a])  # at position start + a
            draft_seqs.append((seq.seq_id, start + a + 2))
            at.append((seq, start + a))
        ids = torch.tensor(nxt, dtype=torch.long, device=x.device)
        idx = torch.tensor(draft_rows, dtype=torch.long, device=x.device)
        if self._graphed and self.graphs.mtp:
            m = self.graphs.run_mtp(ids, x)  # [T, H] (its KV written either way)
            if not draft_rows:
                return
            m = m.index_select(0, idx)
        elif not draft_rows:  # no row's output is read: only the KV the next passes attend to
            self.forward_mtp(ids, x, batch, step=True, kv_only=True)
            return
        elif batch.prefill and batch.mrope_positions is None and len(nxt) > MTP_ROWS_ONLY * len(at):
            # a prompt chunk: every row's K / V, then the whole layer at the draft rows only, as
            # decode rows over that KV (a chunk of 2,048 rows drafts from one)
            self.forward_mtp(ids, x, batch, step=True, kv_only=True)
            rows = self._decode_batch([sq for sq, _ in at], [p for _, p in at])
            m = self.forward_mtp(ids.index_select(0, idx), x.index_select(0, idx), rows, step=False)
        else:
            m = self.forward_mtp(ids, x, batch, step=True).index_select(0, idx)
        # the grammar's state for each draft: after this step's tokens (not yet advanced over)
        after = [[result.sampled[s.seq_id], *result.bonus.get(s.seq_id, [])] for s, _ in at]
        tokens = self._draft_tokens(m, [sq for sq, _ in at], after)
        for j, ((seq_id, pos), t) in enumerate(zip(draft_seqs, tokens, strict=True)):
            if t is None:
                spec.forget(seq_id)
            else:
                spec.drafts[seq_id] = Draft(pos, t, m[j] if spec.k > 1 else None)

    def _draft_tokens(self, m: torch.Tensor, seqs, after) -> list[int | None]:
        """The MTP head's output rows [N, H] of `seqs` -> greedy drafts. A draft needs no exact
        argmax: the int8 screen's where there is one. A sequence with a grammar drafts the
        largest logit the grammar allows after the tokens `after` (those of its drafts so far,
        or of the step: the live matcher has not consumed them), None where it allows none."""
        scores = self.head_screen.screen(m) if self.head_screen is not None else self.head_logits(m)
        tokens: list[int | None] = argmax(scores).tolist()
        g = [j for j, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if g and self.logits_processor is not None:
            idx = torch.tensor(g, dtype=torch.long, device=scores.device)
            sub = scores.index_select(0, idx).float()
            dead = self.logits_processor(sub, [seqs[j] for j in g], [after[j] for j in g]) or {}
            for n, t in enumerate(argmax(sub).tolist()):
                tokens[g[n]] = None if n in dead else t
        return tokens

    def _chain(self, scheduled, verify) -> None:
        """Extend each verifying sequence's drafts to its `want` (engine/speculative.py): the
        MTP head again on its own last output row and the last draft, one decode row per
        sequence, at the position before that draft's (KV there is rewritten by the step's
        own MTP pass). Not for sequences with images (their positions are 3-D)."""
        spec = self.spec
        todo = []
        for i, v in verify.items():
            seq = scheduled[i].seq
            d = spec.drafts.get(seq.seq_id)
            if len(v.drafts) < v.want and d is not None and d.hidden is not None and not seq.mm_items:
                todo.append((scheduled[i], v, d))
        while todo:
            pos = [s.start + len(v.drafts) - 1 for s, v, _ in todo]
            batch = self._decode_batch([s.seq for s, _, _ in todo], pos,
                                       [v.drafts[-1] for _, v, _ in todo])  # fmt: skip
            hidden = torch.stack([d.hidden for _, _, d in todo])
            g = self.graphs
            if g is not None and g.mtp and g.can_run(batch):
                m = g.run_mtp_decode(batch.input_ids, hidden, batch)  # [N, H]
            else:
                m = self.forward_mtp(batch.input_ids, hidden, batch, step=False)
            tokens = self._draft_tokens(m, [s.seq for s, _, _ in todo], [v.drafts for _, v, _ in todo])
            for (_, v, d), row, t in zip(todo, m, tokens, strict=True):
                if t is None:  # the grammar allows nothing after the drafts: they stop there
                    v.want = len(v.drafts)
                else:
                    v.drafts.append(t)
                    d.hidden = row
            todo = [e for e in todo if len(e[1].drafts) < e[1].want]

    def _decode_batch(self, seqs, positions: list[int], input_ids=None) -> ForwardBatch:
        """One decode row per sequence at `positions` (its KV slot there, attending up to it):
        the MTP head's passes at chosen rows (_chain, _draft)."""
        bs = self.caches.block_size
        return ForwardBatch.build(
            positions=positions,
            cu_seqlens=range(len(seqs) + 1),
            context_lens=[p + 1 for p in positions],
            slot_mapping=[q.block_ids[p // bs] * bs + p % bs
                          for q, p in zip(seqs, positions, strict=True)],  # fmt: skip
            block_tables=[q.block_ids for q in seqs],
            state_slots=[q.state_slot for q in seqs],
            has_initial_state=[True] * len(seqs),
            logits_indices=range(len(seqs)),
            device=self.device,
            backend=self.backend,
            input_ids=input_ids,
        )

    def _screen_ks(self, num_rows: int, seqs, shifts=None) -> tuple[list[int] | None, str | None]:
        """Each row's k where every row of the step can take the int8 screen (screen_k), and
        the step's kind for the back-off (greedy, top-k or grammar); (None, None): the full
        head. shifts: tokens each row's sequence has beyond its token_ids (a bonus row's
        draft)."""
        head = self.head_screen
        if head is None or not 0 < len(seqs) == num_rows <= head.max_rows:
            return None, None
        ks = _row_ks(seqs, shifts or [0] * len(seqs))
        if None in ks:
            return None, None
        kind = "greedy" if max(ks) == 1 else "top-k"
        if any(s.params.structured_outputs is not None for s in seqs):
            kind = "grammar"
        if self._screen_skip[kind] > 0:  # backing off after undecided screens
            self._screen_skip[kind] -= 1
            return None, None
        return ks, kind

    def _screen_outcome(self, kind: str, decided: bool) -> None:
        """An undecided screen cost its read for nothing (flat distributions, a top-k whose
        k-th logit has thousands of near-ties, a grammar whose tokens the model ranks low):
        skip the next 2^misses such steps (<= 64). Two decided in a row end the back-off (one
        would let steps that alternate keep paying for the misses: `bench/grammar_screen.py`'s
        digits took the screen every other step, 0.94x of the full head)."""
        if decided:
            self._screen_hits[kind] += 1
            if self._screen_hits[kind] >= 2:
                self._screen_misses[kind] = 0
        else:
            self._screen_hits[kind] = 0
            self._screen_misses[kind] += 1
            self._screen_skip[kind] = min(64, 2 ** self._screen_misses[kind])


# a row under a grammar screens at least this many of its largest logits (grammar_ks); its
# masked argmax / top-k is among them where enough tokens the grammar allows are (_grammar_rows)
GRAMMAR_SCREEN_K = 16
# a step with prefill rows and more than this many rows per draft row runs the MTP head's whole
# layer at its draft rows only (_draft; the other rows' K / V only)
MTP_ROWS_ONLY = 8


def lora_groups(rows: dict[int, list[int]], num_rows: int, device) -> list:
    """ForwardBatch.lora from adapter id -> its rows: rows as an index tensor, or None where
    one adapter has every row of the step."""
    if len(rows) == 1 and len(next(iter(rows.values()))) == num_rows:
        return [(next(iter(rows)), None)]
    return [(aid, torch.tensor(r, dtype=torch.long).to(device)) for aid, r in rows.items()]


def _with_drafts(scheduled, verify) -> list:
    """The scheduled list as the batch runs it: verified sequences longer by their drafts."""
    if not verify:
        return scheduled
    return [
        dataclasses.replace(s, num_new_tokens=s.num_new_tokens + len(verify[i].drafts))
        if i in verify
        else s
        for i, s in enumerate(scheduled)
    ]


def screen_k(p, num_output: int) -> int | None:
    """How many of its largest logits a row's next token depends on, where that is all it
    depends on: 1 for greedy, top_k (at least 2) for sampled rows with 0 < top_k <= MAX_TOP_K
    (their temperature, min-p and top-p act within those); under a grammar more (grammar_ks),
    whose masked top tokens are then certified or recomputed (_grammar_rows); None where
    anything reads other logits (logprobs, penalties, logit bias, pending min_tokens, no
    top-k)."""
    from qwen35.models.head_screen import MAX_TOP_K

    if p.structured_outputs is not None:
        ks = grammar_ks(p) if device_sampled(p, num_output, grammar=False) else None
        return None if ks is None else ks[1]
    if not device_sampled(p, num_output):
        return None
    if is_greedy(p):
        return 1
    # a sampled row with top_k = 1 still draws among the tokens tied with its largest logit (the
    # sampler keeps ties): k = 2 keeps it off the greedy-only path (HeadScreen.tokens, the
    # first of them), and its screened logits hold those ties exactly
    return max(2, p.top_k) if 0 < p.top_k <= MAX_TOP_K else None


def grammar_ks(p) -> tuple[int, int] | None:
    """A row under a grammar: (k, K), its k largest allowed logits decide its token (greedy 1,
    sampled its top_k, at least 2: screen_k) and the screen keeps its K largest (at least
    GRAMMAR_SCREEN_K: room for tokens the grammar bans); None without a top-k. A larger K
    decides more rows but leaves more candidates to compute exactly (on the 0.8B's random,
    flat rows ~1,700 at K = 20, past the screen's limit at 64): `python bench/grammar_screen.py`
    at K = 8 / 16 / 32 greedy 1.10 / 1.12 / 1.08x of the full head on free text, sampled top-20
    at K = 20 / 32 / 40 1.03 / 1.00 / 0.95x."""
    from qwen35.models.head_screen import MAX_TOP_K

    if is_greedy(p):
        return 1, GRAMMAR_SCREEN_K
    if not 0 < p.top_k <= MAX_TOP_K:
        return None
    k = max(2, p.top_k)
    return k, max(GRAMMAR_SCREEN_K, k)


def _row_ks(seqs, shifts) -> list[int | None]:
    """Each row's screen_k (1: greedy and nothing else); shifts: tokens each row's sequence has
    beyond its token_ids (a bonus row's drafts)."""
    return [
        screen_k(s.params, len(s.token_ids) + d - s.num_prompt_tokens)
        for s, d in zip(seqs, shifts, strict=True)
    ]


def _greedy_tokens(logits: torch.Tensor) -> list[int] | None:
    """Each row's argmax as the sampler takes it, read in one copy; None where a row's maximum
    is not finite (the sampler then fails that row alone)."""
    top = argmax(logits)  # [S]
    best = logits.gather(1, top[:, None])[:, 0]
    tokens, values = torch.stack([top.double(), best.double()]).tolist()  # (exact in fp64)
    if not all(math.isfinite(v) for v in values):
        return None
    return [int(t) for t in tokens]


def device_sampled(p, num_output: int, grammar: bool = True) -> bool:
    """A row whose next token the sampler draws from its logits and the request's parameters
    alone (greedy, or temperature / top-k / top-p / min-p with the request's or the shared
    generator): nothing read from the host's token lists, no logprobs to return. Not: logprobs,
    penalties, logit bias, allowed / bad words, a grammar, min_tokens still pending, the
    position where a thinking budget may force the end of the think block (its row is the
    only one that needs the host: multi-step decoding stops short of it, `_steps`).
    grammar=False: all but the grammar."""
    return not (
        p.logprobs is not None
        or has_penalties(p)
        or p.logit_bias
        or p.allowed_token_ids
        or p.bad_words_token_ids
        or (grammar and p.structured_outputs is not None)
        or num_output < p.min_tokens
        or (p.think_end_token_id is not None and num_output == p.thinking_token_budget)
    )


def _verify_rows(model: torch.nn.Module, device) -> int | None:
    """SpecState.max_rows: on a CPU the GEMV kernels' row limit in the compute dtype."""
    if torch.device(device).type != "cpu":
        return None
    from qwen35.layers.linear import GEMV_MAX_ROWS

    return GEMV_MAX_ROWS.get(getattr(model, "dtype", None) or _dtype_of(model), 16)


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()
