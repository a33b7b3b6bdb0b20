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

Speculative decoding (`verify_rows` = k + 1): the graphs return the final norm's output of every
row (the MTP head and the verify sampling read them) instead of logits, and verify steps replay
too (`run_phased`): a bucket of b sequences with r rows each is laid out phase by phase, row
j * b + i holding sequence i's j-th row (its last token, then its drafts), the DeltaNet layers
stepping one phase after the other (DecodeBatch.phases) with the states copied into the spare
slots between phases (`copies`; padding pairs copy the padding slot onto itself). A sequence
with fewer drafts than the step's most has padding rows in the later phases. Captured per
(b, r) for r = 2 .. k + 1 and b = 1, 2, 4, .. up to `verify_seqs`; with the MTP head, each
graph has a twin that runs the head over the same rows (`run_mtp`, `run_mtp_decode`).
"""

from __future__ import annotations

import logging

import torch

from qwen35.engine.forward_batch import DecodeBatch, ForwardBatch, ModelCaches, send_to_device

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
        verify_rows: int = 0,  # speculative decoding: k + 1 (graphs give the hidden rows)
        verify_seqs: int = 0,  # verify steps replay up to this many sequences
        max_rows: int | None = None,  # verify graphs of at most this many rows (MoE kernels)
        mtp: bool = False,  # the MTP head's passes too (speculative decoding with it)
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
        self.hidden = verify_rows > 0  # outputs: the final norm's rows [T, H], not logits
        self.verify_rows = verify_rows if verify_seqs > 0 else 0
        self.verify_buckets = graph_buckets(verify_seqs) if self.verify_rows > 1 else []
        # (sequences, rows each) of every graph
        self.keys = [(n, 1) for n in self.buckets] + [
            (n, r) for r in range(2, self.verify_rows + 1) for n in self.verify_buckets
            if max_rows is None or n * r <= max_rows
        ]  # fmt: skip
        dev = caches.key[0].device if caches.key else caches.conv[0].device
        B, W = max(n * r for n, r in self.keys), max_blocks_per_seq
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
        # verify steps: the states copied after phase j (src, dst slots), 2 pairs a sequence
        # (its spare, and a prefix-cache checkpoint's slot): [phase, src / dst, pair]
        vb = max(self.verify_buckets, default=0)
        self.copies = torch.zeros(max(self.verify_rows - 1, 0), 2, 2 * vb, dtype=torch.long,
                                  device=dev)  # fmt: skip
        self._pad(0)
        self._real = 0  # rows 0.._real-1 may hold a step's data; rows from _real on are padding
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        # the MTP head's pass over the rows of the step the buffers hold (its inputs: the token
        # after each row and the final norm's rows, in the buffers' layout), a graph per key
        self.mtp = mtp and self.hidden
        self.mtp_ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.mtp_hidden: torch.Tensor | None = None  # [B, H] in the final norm's dtype
        self.mtp_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.mtp_outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._last: tuple[tuple[int, int], torch.Tensor | None] | None = None  # key, row map
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

    def _batch(self, n: int, r: int = 1) -> ForwardBatch:
        """The static batch of n sequences with r rows each (r > 1: phases of n rows)."""
        T = n * r
        d = DecodeBatch(
            rows=self.rows[:T],
            block_tables=self.block_tables[:T],
            context_lens=self.context_lens[:T],
            state_slots=self.state_slots[:T],
            max_context=self.max_blocks * self.caches.block_size,
            all_rows=True,
            max_context_exact=False,
        )
        if r > 1:
            m = 2 * n
            d.phases = [
                DecodeBatch(rows=self.rows[j * n : (j + 1) * n], block_tables=None,
                            context_lens=None, state_slots=self.state_slots[j * n : (j + 1) * n],
                            max_context=0, row_range=(j * n, (j + 1) * n))  # fmt: skip
                for j in range(r)
            ]
            for j, p in enumerate(d.phases[:-1]):
                p.copies_after = self.copies[j, :, :m]  # [2, m] (src, dst)
        return ForwardBatch(
            positions=self.positions[:T],
            slot_mapping=self.slot_mapping[:T],
            block_tables=self.block_tables[:T],
            logits_indices=self.rows[:T],
            prefill=[],
            decode=d,
            backend=self.backend,
            lora_slots=None if self.lora_slots is None else self.lora_slots[:T],
        )

    def _forward(self, n: int, r: int) -> torch.Tensor:
        batch = self._batch(n, r)
        ids = self.ids[: n * r]
        if not self.hidden:
            return self.model(ids, batch, self.caches)  # [n, V] fp32 logits
        x = self.model.final_norm(self.model.forward_hidden(ids, batch, self.caches),
                                  self.backend)  # [n * r, H]  # fmt: skip
        if self.mtp:  # (its buffer allocated before any capture begins)
            self._mtp_hidden_like(x)
        return x

    def _mtp_hidden_like(self, x: torch.Tensor) -> None:
        if self.mtp_hidden is None:
            self.mtp_hidden = x.new_zeros(self.ids.shape[0], x.shape[1])

    def _forward_mtp(self, n: int, r: int) -> torch.Tensor:
        T = n * r
        return self.model.forward_mtp(self.mtp_ids[:T], self.mtp_hidden[:T], self._batch(n, r),
                                      self.caches)  # [T, H]  # fmt: skip

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller graphs reuse its memory pool)."""
        pool = None

        def one(fn, key):
            nonlocal pool
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks kernels
                for _ in range(2):
                    fn(*key)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = fn(*key)
            pool = graph.pool() if pool is None else pool
            return graph, out

        for key in sorted(self.keys, key=lambda k: k[0] * k[1], reverse=True):
            self._pad(0)
            self.graphs[key], self.outputs[key] = one(self._forward, key)
            if self.mtp:
                self.mtp_graphs[key], self.mtp_outputs[key] = one(self._forward_mtp, key)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s%s", self.buckets,
                 f"; verify steps of {self.verify_buckets} sequences x 2..{self.verify_rows} rows"
                 if self.verify_buckets else "")  # fmt: skip

    def can_run(self, batch: ForwardBatch) -> bool:
        d = batch.decode
        return (
            (bool(self.graphs) or self.eager)
            and not batch.prefill
            and batch.lora is None  # per-adapter LoRA runs eagerly; stacked slots replay
            and (batch.lora_slots is None or self.lora_slots is not None)
            and d is not None
            and d.all_rows
            and d.phases is None
            and d.fresh_slots is None
            and batch.num_tokens <= self.max_batch
            and batch.logits_indices.shape[0] == batch.num_tokens
            and batch.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [N, V] fp32 of a step that `can_run` (a view of the graph's output buffer:
        valid until the next replay); the final norm's rows [N, H] with drafts on."""
        n, b = batch.num_tokens, self._load(batch)
        self.ids[:n].copy_(input_ids)
        return self._replay(b, 1)[:n]

    def run_mtp_decode(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                       batch: ForwardBatch) -> torch.Tensor:  # fmt: skip
        """The MTP head's output rows [N, H] of a decode-shaped batch that `can_run` (a chain
        of drafts: input_ids the last drafts, hidden the head's rows that made them)."""
        self._load(batch)
        return self.run_mtp(input_ids, hidden)

    def _load(self, batch: ForwardBatch) -> int:
        """A decode batch's index tensors into the buffers' first rows; -> its bucket."""
        n = batch.num_tokens
        b = next(x for x in self.buckets if x >= n)
        self._last = ((b, 1), None)
        d = batch.decode
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
        return b

    def _replay(self, n: int, r: int) -> torch.Tensor:
        if self.eager:
            return self._forward(n, r)
        self.graphs[n, r].replay()
        return self.outputs[n, r]

    def run_mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP head's output rows [T, H] over the rows of the step the buffers hold (the
        last `run` / `run_phased` / `run_mtp_decode`), in its row order: next_ids [T] the token
        after each row, hidden [T, H] the final norm's rows."""
        (n, r), idx = self._last
        T = next_ids.shape[0]
        self._mtp_hidden_like(hidden)
        if idx is None:
            self.mtp_ids[:T].copy_(next_ids)
            self.mtp_hidden[:T].copy_(hidden)
        else:
            self.mtp_ids.index_copy_(0, idx, next_ids)
            self.mtp_hidden.index_copy_(0, idx, hidden)
        if self.eager:
            out = self._forward_mtp(n, r)
        else:
            self.mtp_graphs[n, r].replay()
            out = self.mtp_outputs[n, r]
        return out[:T].clone() if idx is None else out.index_select(0, idx)  # (a copy)

    def _verify_key(self, seq_rows: list[list[int]]) -> tuple[int, int] | None:
        """The (sequences, rows each) graph a verify step replays in, None: none captured."""
        n, r = len(seq_rows), max(map(len, seq_rows), default=0)
        if r < 2:
            return None
        return next(((b, r) for b in self.verify_buckets if b >= n and (b, r) in self.keys), None)

    def can_run_phased(self, batch: ForwardBatch, seq_rows: list[list[int]]) -> bool:
        """A verify step (phased decode batch, engine/speculative.py) that a graph takes:
        seq_rows, each sequence's rows in the step (its token, then its drafts)."""
        d = batch.decode
        return (
            (bool(self.graphs) or self.eager)
            and self._verify_key(seq_rows) is not None
            and d is not None
            and d.phases is not None
            and d.fresh_slots is None
            and batch.lora is None
            and (batch.lora_slots is None or self.lora_slots is not None)
            and batch.block_tables.shape[1] <= self.max_blocks
            and all(len(c) <= 2 * len(seq_rows) for c in d.phase_copies)
        )

    def run_phased(self, input_ids: torch.Tensor, batch: ForwardBatch,
                   seq_rows: list[list[int]]) -> torch.Tensor:  # fmt: skip
        """The final norm's rows [T, H] of a verify step that `can_run_phased`, in the step's
        row order (sequence i's j-th row at row j * b + i of the bucket of b sequences)."""
        b, r = self._verify_key(seq_rows)
        T = b * r
        dest = [0] * batch.num_tokens
        for i, rows in enumerate(seq_rows):
            for j, row in enumerate(rows):
                dest[row] = j * b + i
        idx = send_to_device(torch.tensor(dest, dtype=torch.long), self.ids.device)
        self._last = ((b, r), idx)
        self._pad(0, T)
        self._real = max(self._real, T)
        d = batch.decode
        self.ids.index_copy_(0, idx, input_ids)
        self.positions.index_copy_(0, idx, batch.positions)
        self.slot_mapping.index_copy_(0, idx, batch.slot_mapping)
        self.block_tables[:, : d.block_tables.shape[1]].index_copy_(0, idx, d.block_tables)
        self.context_lens.index_copy_(0, idx, d.context_lens)
        self.state_slots.index_copy_(0, idx, d.state_slots)
        if self.lora_slots is not None and batch.lora_slots is not None:
            self.lora_slots.index_copy_(0, idx, batch.lora_slots)
        pairs = torch.full((r - 1, 2, 2 * b), self.pad_slot, dtype=torch.long)
        for j, copies in enumerate(d.phase_copies[: r - 1]):
            if copies:
                pairs[j, :, : len(copies)] = torch.tensor(copies, dtype=torch.long).T
        self.copies[: r - 1, :, : 2 * b].copy_(send_to_device(pairs, self.ids.device))
        return self._replay(b, r).index_select(0, idx)
