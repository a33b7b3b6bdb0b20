"""Multimodal rotary positions (M-RoPE), as transformers' `Qwen3_5Model.get_rope_index`.

Text tokens get (p, p, p) with p counting on from the previous position; the tokens of one image
(or one video frame: videos are split per frame, timestamps between them are text) of a merged
grid gh x gw get (s, s + row, s + col) with s the position where it starts, and the text after it
continues at s + max(gh, gw). `delta` = last position + 1 - prompt length: generated token i
(0-based over the whole sequence) sits at i + delta on all three streams. Text-only prompts give
positions 0..L-1 and delta 0, exactly the 1-D positions.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(
    num_tokens: int, segments: list[tuple[int, int, int]]
) -> tuple[np.ndarray, int]:
    """segments: (offset, gh, gw) of each image / video frame in the prompt, in merged units
    (gh * gw tokens from offset), ascending. -> positions int64 [3, num_tokens], delta."""
    pos = np.empty((3, num_tokens), dtype=np.int64)
    cur, i = 0, 0  # next text position, next token index
    for off, gh, gw in segments:
        n = off - i
        pos[:, i:off] = np.arange(cur, cur + n)
        cur, i = cur + n, off
        rows = np.repeat(np.arange(gh), gw)
        cols = np.tile(np.arange(gw), gh)
        pos[0, i : i + gh * gw] = cur
        pos[1, i : i + gh * gw] = cur + rows
        pos[2, i : i + gh * gw] = cur + cols
        cur, i = cur + max(gh, gw), i + gh * gw
    pos[:, i:] = np.arange(cur, cur + num_tokens - i)
    delta = int(pos.max()) + 1 - num_tokens if num_tokens else 0
    return pos, delta
