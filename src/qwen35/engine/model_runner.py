"""Runs one scheduled step: builds the ForwardBatch, runs the model over the paged caches, samples.

The runner holds the cache tensors (the engine allocates them from `cache_spec` with
`forward_batch.allocate_caches` and hands them over) and the per-sequence random generators; it
knows nothing of text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35 import kernels
from qwen35.engine.forward_batch import ForwardBatch, ModelCaches
from qwen35.engine.sampler import Sampler, SamplingRow, make_generator
from qwen35.request import TokenLogprob


@dataclass
class StepResult:
    sampled: dict[str, int]  # seq_id -> next token
    logprobs: dict[str, TokenLogprob]  # seq_id -> logprob info (only where asked)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        caches: ModelCaches,
        eos_token_ids: tuple[int, ...],
        device: torch.device | str = "cpu",
        seed: int | None = None,  # the sampler's shared generator (unseeded requests)
    ):
        self.model = model
        self.caches = caches
        self.device = torch.device(device)
        if self.device.type == "cpu":
            kernels.load()  # compile (first run on a machine) now, not in the first decode step
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampler = Sampler(seed=seed)
        self._generators: dict[str, torch.Generator | None] = {}

    # ---- per-sequence sampling state ------------------------------------------------------
    def add_sequence(self, seq_id: str, seed: int | None) -> None:
        self._generators[seq_id] = make_generator(seed, self.device)

    def remove_sequence(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    # ---- one step -----------------------------------------------------------------------
    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        """Copy DeltaNet conv + recurrent state between slots (prefix-cache restore)."""
        for conv, rec in zip(self.caches.conv, self.caches.recurrent):
            conv[dst_slot].copy_(conv[src_slot])
            rec[dst_slot].copy_(rec[src_slot])

    def build_batch(self, scheduled) -> tuple[torch.Tensor, ForwardBatch, list]:
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
        for i, s in enumerate(scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            end = start + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + n)
            context_lens.append(end)
            tables.append(blocks)
            state_slots.append(seq.state_slot)
            has_init.append(start > 0)
            if s.sample:
                logits_rows.append(cu[-1] - 1)
                sample_seqs.append(seq)
            checkpoints.extend((i, off, dest) for off, dest in s.checkpoints)
        width = max((len(t) for t in tables), default=1) or 1
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            if t:
                table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        batch = ForwardBatch(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            cu_seqlens=cu,
            context_lens=context_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=table.to(dev),
            state_slots=torch.tensor(state_slots, dtype=torch.long, device=dev),
            has_initial_state=has_init,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            state_checkpoints=checkpoints,
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), batch, sample_seqs

    @torch.inference_mode()
    def execute(self, scheduled) -> StepResult:
        for s in scheduled:
            if s.restore_from is not None:
                self.copy_state(s.restore_from, s.seq.state_slot)
        if not scheduled:
            return StepResult({}, {})
        input_ids, batch, sample_seqs = self.build_batch(scheduled)
        logits = self.model(input_ids, batch, self.caches)  # [S, V] fp32
        if not sample_seqs:
            return StepResult({}, {})
        rows = [
            SamplingRow(
                params=seq.params,
                # the prompt is read only by the repetition penalty: skip the copy otherwise
                prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens]
                if seq.params.repetition_penalty != 1.0
                else (),
                output_token_ids=seq.token_ids[seq.num_prompt_tokens :],
                generator=self._generators.get(seq.seq_id),
                eos_token_ids=() if seq.params.ignore_eos else self.eos_token_ids,
            )
            for seq in sample_seqs
        ]
        out = self.sampler(logits.float(), rows)
        sampled = {seq.seq_id: int(t) for seq, t in zip(sample_seqs, out.token_ids)}
        lps = {seq.seq_id: lp for seq, lp in zip(sample_seqs, out.logprobs) if lp is not None}
        return StepResult(sampled, lps)
