"""Rank 0's model runner under tensor parallelism: each step (and the prefix-cache state
restores before it) is broadcast to the workers, then every rank runs the model on its shard;
rank 0 gets the gathered logits and samples, as the single-process runner does.

Speculative decoding: a step is several model calls with collectives in each (the hidden rows,
the head over the sampled and draft rows, the MTP head's pass, a chain's passes), with rank 0's
sampling between them. Each is broadcast before rank 0 makes it, so the workers make the same
calls in the same order (parallel/worker.py); the state copies of rejected drafts go with the
next message's restores. A step with prompt logprobs takes the same "hidden" and "head" calls."""

from __future__ import annotations

import dataclasses

import torch

from qwen35.engine.forward_batch import ForwardBatch
from qwen35.engine.model_runner import ModelRunner
from qwen35.parallel.group import WorkerGroup, broadcast
from qwen35.parallel.worker import to_device


class ParallelModelRunner(ModelRunner):
    def __init__(self, model, caches, eos_token_ids, device, group: WorkerGroup, **kw):
        super().__init__(model, caches, eos_token_ids, device, **kw)
        self.group = group
        self._restores: list[tuple[int, int]] = []  # sent with the next step

    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        super().copy_state(src_slot, dst_slot)
        self._restores.append((src_slot, dst_slot))

    def put_back(self, pairs: list[tuple[int, int]]) -> None:
        super().put_back(pairs)
        self._restores.extend(pairs)

    def run_model(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        msg = ("step", self._take_restores(), input_ids.cpu(), _sendable(batch))
        return self.group.guard(self._both, msg, self.model, input_ids, batch, self.caches)

    def forward_hidden(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        msg = ("hidden", self._take_restores(), input_ids.cpu(), _sendable(batch))
        fn = self.model.forward_hidden
        return self.group.guard(self._both, msg, fn, input_ids, batch, self.caches)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.guard(self._both, ("head", x.cpu()), self.model.head_logits, x)

    def forward_mtp(self, next_ids, hidden, batch: ForwardBatch, step: bool, kv_only=False):
        # the step's own rows are on every rank already (the workers kept theirs)
        sent = (None, None) if step else (hidden.cpu(), _sendable(batch))
        msg = ("mtp", next_ids.cpu(), *sent, kv_only)
        fn = self.model.forward_mtp
        args = (next_ids, hidden, batch, self.caches, kv_only)
        return self.group.guard(self._both, msg, fn, *args)

    def _take_restores(self) -> list[tuple[int, int]]:
        out, self._restores = self._restores, []
        return out

    def _both(self, msg, fn, *args):
        broadcast(self.group.control, msg)
        return fn(*args)


def _sendable(batch: ForwardBatch) -> ForwardBatch:
    """The batch on the CPU without its backend (it holds modules, not picklable: each worker
    uses its own, chosen once)."""
    return dataclasses.replace(to_device(batch, torch.device("cpu")), backend=None)
