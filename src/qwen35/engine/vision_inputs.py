"""The runner's vision side of a step: encode the images / videos whose tokens are scheduled,
keep their embeddings until the sequence has consumed them all (chunked prefill may split an
image across steps: it is encoded once), and fill the ForwardBatch's 3-D rotary positions and
the rows that replace the pad tokens' embeddings.

Steps without a sequence that has images leave the batch untouched (1-D positions), so
text-only batches run exactly as without the vision tower. Steps whose tokens all have three
equal position streams (decode after the images) get 1-D positions shifted by the sequence's
rope delta instead of 3-D ones: the same rotary, and a decode CUDA graph can replay them.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen35.engine.forward_batch import ForwardBatch


class VisionInputs:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.cache: dict[tuple[str, int], torch.Tensor] = {}  # (seq_id, item) -> [tokens, H]
        self.num_encoded_items = 0  # items run through the encoder (stats and tests)

    def drop(self, seq_id: str) -> None:
        for key in [k for k in self.cache if k[0] == seq_id]:
            del self.cache[key]

    def apply(self, scheduled, batch: ForwardBatch) -> None:
        if not any(s.seq.mm_items for s in scheduled):
            return
        T = batch.num_tokens
        cu = np.cumsum([0] + [s.num_new_tokens for s in scheduled])  # rows in scheduled order
        pos = np.empty((3, T), dtype=np.int64)
        rows: list[np.ndarray] = []
        pieces: list[tuple[tuple[str, int], int, int]] = []  # (key, first emb row, count)
        todo: list[tuple[tuple[str, int], object]] = []
        for i, s in enumerate(scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            end, r0 = start + n, int(cu[i])
            p = np.arange(start, end)
            if seq.mrope is None:
                pos[:, r0 : r0 + n] = p
            else:
                P = seq.mrope.shape[1]
                k = min(max(P - start, 0), n)
                pos[:, r0 : r0 + k] = seq.mrope[:, start : start + k]
                pos[:, r0 + k : r0 + n] = p[k:] + seq.rope_delta
            for j, it in enumerate(seq.mm_items):
                if it.end <= start or it.start >= end:
                    continue
                key = (seq.seq_id, j)
                if key not in self.cache:
                    todo.append((key, it))
                e0 = 0
                for off, cnt in it.segments:
                    a, b = max(off, start), min(off + cnt, end)
                    if a < b:
                        rows.append(np.arange(a, b) - start + r0)
                        pieces.append((key, e0 + a - off, b - a))
                    e0 += cnt
        if todo:
            self._encode(todo)
        embeds = [self.cache[key][e : e + c] for key, e, c in pieces]
        dev = self.device
        if (pos[0] == pos[1]).all() and (pos[0] == pos[2]).all():
            # three equal streams (text after the images: p + rope_delta, e.g. every decode
            # step): the 1-D rotary gives bit for bit the same cos / sin, and a decode CUDA
            # graph, which reads 1-D positions, can replay the step
            batch.positions = torch.from_numpy(pos[0].copy()).to(dev)
        else:
            batch.mrope_positions = torch.from_numpy(pos).to(dev)
        if embeds:
            batch.mm_rows = torch.from_numpy(np.concatenate(rows)).to(dev)
            batch.mm_embeds = torch.cat(embeds)
        for s in scheduled:  # consumed entirely: free
            end = s.start + s.num_new_tokens
            for j, it in enumerate(s.seq.mm_items):
                if it.end <= end:
                    self.cache.pop((s.seq.seq_id, j), None)

    def _encode(self, todo) -> None:
        """One encoder call over every new item of the step (variable-length, no padding)."""
        pixels = torch.from_numpy(np.concatenate([it.pixels for _, it in todo]))
        out = self.model.encode_vision(pixels.to(self.device), [it.grid for _, it in todo])
        sizes = [it.num_tokens for _, it in todo]
        for (key, _), e in zip(todo, out.split(sizes), strict=False):
            self.cache[key] = e
        self.num_encoded_items += len(todo)
