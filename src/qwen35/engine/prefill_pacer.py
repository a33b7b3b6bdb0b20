"""How many prompt tokens a step may take while other sequences are decoding.

A step's token budget (`--max-num-batched-tokens`, 2,048) suits a GPU, where such a chunk takes
tens of milliseconds. On a CPU the same chunk takes seconds (Qwen3.5-4B in bf16 on 2 cores:
~18 s), and every stream in flight waits that long for its next token. While some sequence
decodes, the engine therefore cuts prompt chunks to what its measured prefill rate gets through
in `--max-decode-step-ms`: streams keep getting tokens while a long prompt prefills, and a prompt
alone (nothing decoding) still takes whole budgets. On a GPU the rate is high enough that the cap
stays above the budget. With pacing on, a short request that arrives while a long prompt
prefills also starts at once, its prompt taken beside that prompt's chunk (whole, or in shares
ahead of it), instead of waiting for the long prompt's last chunk (`Scheduler._short_grants`).
No torch here; the engine times its steps and feeds them in.
"""

from __future__ import annotations

from qwen35.engine.scheduler import PREFILL_GRID

# Fewer prompt rows a step than this cost more than they save: each step streams every weight
# once, and on a 2-core CPU 128-row chunks prefill at ~85% of 2,048-row ones, 64-row at ~70%.
MIN_PREFILL_CAP = 2 * PREFILL_GRID


class PrefillPacer:
    """Running estimate of prompt tokens per second in steps that prefill, and the cap a step
    with decoding sequences gets: rate x target, on the PREFILL_GRID, at least MIN_PREFILL_CAP.
    Steps that were capped measure the rate they ran at (decode rows included), so the cap
    settles where such a step takes about the target."""

    def __init__(self, target_ms: float, smoothing: float = 0.5):
        if target_ms < 0:
            raise ValueError(f"max_decode_step_ms must be >= 0 (0: off), got {target_ms}")
        self.target_s = target_ms / 1000.0
        self.smoothing = smoothing
        self.rate: float | None = None  # prompt tokens a second; None until a step prefilled

    @property
    def short_first(self) -> bool:
        """With pacing on, short prompts also go ahead of a long prompt's chunk instead of
        after its last (Scheduler.schedule short_first)."""
        return bool(self.target_s)

    def cap(self) -> int:
        """The next step's decode_prefill_cap (Scheduler.schedule); 0: no cap. Before any step
        has been timed, the floor: that first paced step (at a server's start, a long prompt
        beside a stream whose own short prompt said nothing) is measured and sets the rate."""
        if not self.target_s:
            return 0
        if self.rate is None:
            return MIN_PREFILL_CAP
        tokens = int(self.rate * self.target_s) // PREFILL_GRID * PREFILL_GRID
        return max(MIN_PREFILL_CAP, tokens)

    def record(self, prefill_tokens: int, seconds: float) -> None:
        """A step that ran `prefill_tokens` prompt tokens (and any decode rows) in `seconds`.
        Steps of fewer than MIN_PREFILL_CAP prompt tokens are left out: their time is mostly
        the step's fixed cost (every weight read once), which would put the rate far too low."""
        if prefill_tokens < MIN_PREFILL_CAP or seconds <= 0:
            return
        rate = prefill_tokens / seconds
        a = self.smoothing
        self.rate = rate if self.rate is None else a * rate + (1 - a) * self.rate
