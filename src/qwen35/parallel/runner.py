"""Rank 0's model runner under tensor parallelism: each step (and the prefix-cache state
restores before it) is broadcast to the workers, then every rank runs the model on its shard;
rank 0 gets the gathered logits and samples, as the single-process runner does."""

from __future__ import annotations

import dataclasses

import torch

from qwen35.engine.forward_batch import ForwardBatch
from qwen35.engine.model_runner import ModelRunner
from qwen35.parallel.group import WorkerGroup, broadcast
from qwen35.parallel.worker import to_device


class ParallelModelRunner(ModelRunner):
    def __init__(self, model, caches, eos_token_ids, device, group: WorkerGroup, seed=None):
        super().__init__(model, caches, eos_token_ids, device, seed=seed)
        self.group = group
        self._restores: list[tuple[int, int]] = []  # sent with the next step

    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        super().copy_state(src_slot, dst_slot)
        self._restores.append((src_slot, dst_slot))

    def run_model(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        cpu = torch.device("cpu")
        # the backend holds modules (not picklable): each worker uses its own, chosen once
        sent = dataclasses.replace(to_device(batch, cpu), backend=None)
        msg = ("step", self._restores, input_ids.to(cpu), sent)
        self._restores = []
        return self.group.guard(self._step, msg, input_ids, batch)

    def _step(self, msg, input_ids, batch) -> torch.Tensor:
        broadcast(self.group.control, msg)
        return self.model(input_ids, batch, self.caches)
