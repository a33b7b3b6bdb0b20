"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed.

On a GPU a decode step is a few thousand small kernels; launched from Python the step is bound
by launch overhead, not by the GPU. Captured once per bucket (1, 2, 4, 8, 16, 32, ... up to the
largest decode batch the engine can run, never above the number of state slots), a step is one
replay. The graph reads static device buffers: token ids, positions, KV slot mapping, block
tables, context lengths and DeltaNet state slots, sized for the largest bucket. A step of N
rows copies its inputs into the first N rows of the buffers; rows N .. bucket-1 are padding
that write nowhere that matters: their KV goes to a padding block and their states to a padding
slot, both reserved by the engine (the caches' last block and last slot, never given to a
sequence), and they attend to that one padded token.

Which steps replay (`can_run`): pure decode steps (every row one token, all sampled), no row
without an initial state, block tables no wider than captured. Everything else runs eagerly.
The backend must read only device tensors in a decode step (`Backend.can_capture`).
"""

from __future__ import annotations

import logging

import torch

from qwen35.engine.forward_batch import DecodeBatch, ForwardBatch, ModelCaches

log = logging.getLogger("qwen35")


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... doubling up to max_batch, and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        caches: ModelCaches,
        backend,
        max_batch: int,
        max_blocks_per_seq: int,
        pad_block: int,
        pad_slot: int,
    ):
        if max_batch > caches.num_slots - 1:
            raise ValueError(
                f"decode graphs for {max_batch} rows need as many state slots plus a padding "
                f"slot; the caches have {caches.num_slots}"
            )
        self.model, self.caches, self.backend = model, caches, backend
        self.buckets = graph_buckets(max_batch)
        self.max_batch, self.max_blocks = max_batch, max_blocks_per_seq
        self.pad_block, self.pad_slot = pad_block, pad_slot
        dev = caches.key[0].device if caches.key else caches.conv[0].device
        B, W = max_batch, max_blocks_per_seq
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(B, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(B, W, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.state_slots = torch.zeros(B, dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        # stacked LoRA adapters (layers/lora.py LoraSlots): each row's adapter slot, 0: none
        step = getattr(model, "lora_step", None)
        self.lora_slots = None
        if step is not None and step.stacked:
            self.lora_slots = torch.zeros(B, dtype=torch.long, device=dev)
        self._pad(0)
        self._real = 0  # rows 0.._real-1 may hold a step's data; rows from _real on are padding
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # tests on a CPU: run the bucket's forward eagerly on the static buffers (same padding,
        # same batch as the captured graph would replay)
        self.eager = False

    def _pad(self, n: int, end: int | None = None) -> None:
        """Rows n..end-1 (default: all from n) become padding: position 0 in the padding block,
        the padding state slot."""
        r = slice(n, end)
        self.ids[r] = 0
        self.positions[r] = 0
        self.slot_mapping[r] = self.pad_block * self.caches.block_size
        self.block_tables[r] = self.pad_block
        self.context_lens[r] = 1
        self.state_slots[r] = self.pad_slot
        if self.lora_slots is not None:
            self.lora_slots[r] = 0

    def _batch(self, n: int) -> ForwardBatch:
        d = DecodeBatch(
            rows=self.rows[:n],
            block_tables=self.block_tables[:n],
            context_lens=self.context_lens[:n],
            state_slots=self.state_slots[:n],
            max_context=self.max_blocks * self.caches.block_size,
            all_rows=True,
        )
        return ForwardBatch(
            positions=self.positions[:n],
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n],
            logits_indices=self.rows[:n],
            prefill=[],
            decode=d,
            backend=self.backend,
            lora_slots=None if self.lora_slots is None else self.lora_slots[:n],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller graphs reuse its memory pool)."""
        pool = None
        for n in reversed(self.buckets):
            self._pad(0)
            batch = self._batch(n)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks kernels
                for _ in range(2):
                    self.model(self.ids[:n], batch, self.caches)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.ids[:n], batch, self.caches)  # [n, V] fp32
            pool = graph.pool() if pool is None else pool
            self.graphs[n], self.outputs[n] = graph, out
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, batch: ForwardBatch) -> bool:
        d = batch.decode
        return (
            (bool(self.graphs) or self.eager)
            and not batch.prefill
            and batch.lora is None  # per-adapter LoRA runs eagerly; stacked slots replay
            and (batch.lora_slots is None or self.lora_slots is not None)
            and d is not None
            and d.all_rows
            and d.fresh_slots is None
            and batch.num_tokens <= self.max_batch
            and batch.logits_indices.shape[0] == batch.num_tokens
            and batch.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [N, V] fp32 of a step that `can_run` (a view of the graph's output buffer:
        valid until the next replay)."""
        n = batch.num_tokens
        b = next(x for x in self.buckets if x >= n)
        d = batch.decode
        self.ids[:n].copy_(input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.block_tables[:n, : d.block_tables.shape[1]].copy_(d.block_tables)
        self.context_lens[:n].copy_(d.context_lens)
        self.state_slots[:n].copy_(d.state_slots)
        if self.lora_slots is not None:
            if batch.lora_slots is not None:
                self.lora_slots[:n].copy_(batch.lora_slots)
            else:
                self.lora_slots[:n].zero_()
        if n < self._real:  # rows n.. held the data of a larger step: padding again (only
            self._pad(n, self._real)  # then: six small fills a step saved while n stays put)
        self._real = n
        if self.eager:
            return self.model(self.ids[:b], self._batch(b), self.caches)[:n]
        self.graphs[b].replay()
        return self.outputs[b][:n]
