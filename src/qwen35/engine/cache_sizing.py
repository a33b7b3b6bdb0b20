"""Sizing the engine's caches under a memory budget, with the planner's formulas.

Budget for caches = max_memory - weights - working memory (or a default on the CPU). From it:
1. one DeltaNet state slot per concurrent sequence (max_num_seqs, lowered if slots would take
   more than half the budget),
2. prefix-cache state checkpoints (`prefix_cache_memory`, default a quarter of what is left),
3. paged KV blocks with the rest.
Every byte count comes from the planner's formulas (`cache_spec`, `working_memory_bytes`) in the
model's dtype, so the planner's bytes are the engine's bytes. No torch import (the GPU's free
memory is asked for only when no budget is given).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from qwen35.cache_spec import cache_spec
from qwen35.config import ModelConfig
from qwen35.engine.scheduler import default_checkpoint_interval
from qwen35.errors import Qwen35Error
from qwen35.plan.planner import working_memory_bytes

log = logging.getLogger("qwen35")

GiB = 1 << 30
DEFAULT_CPU_CACHE_BYTES = 2 * GiB  # no --max-memory on a CPU: caches get this much


def size_str(b: int) -> str:
    """Bytes for a message: GiB from 1 GiB on, MiB from 1 MiB, else bytes."""
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    return f"{b / (1 << 20):.1f} MiB" if b >= 1 << 20 else f"{b:,} B"


def parse_bytes(value: str | int | None, what: str = "--max-memory") -> int | None:
    """'8GiB', '8GB', '512MiB', '1e9' or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise Qwen35Error(f"{what} {value!r} is not a size; write e.g. 8GiB, 512MiB or 2e9")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper().rstrip("B")
    scale = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 1 << 10,
        "MI": 1 << 20,
        "GI": 1 << 30,
        "TI": 1 << 40,
    }[unit]
    return int(num * scale)


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    block_size: int
    num_state_slots: int
    num_checkpoint_slots: int
    checkpoint_interval: int
    max_model_len: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    cache_bytes: int
    # speculative decoding: a spare DeltaNet state per draft and running sequence (the state
    # before a rejected draft), and the MTP head's KV layer (counted in kv_bytes_per_token)
    num_spare_slots: int = 0

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        kv = self.kv_tokens * self.kv_bytes_per_token
        st = self.num_state_slots * self.state_bytes_per_sequence
        ck = self.num_checkpoint_slots * self.state_bytes_per_sequence
        spare = (
            f", {self.num_spare_slots} spare state slots for speculative decoding "
            f"({g(self.num_spare_slots * self.state_bytes_per_sequence)})"
            if self.num_spare_slots
            else ""
        )
        at_most = min(self.num_state_slots, max(1, self.kv_tokens // max(1, self.max_model_len)))
        if at_most > 1:
            allows = f", or {at_most} concurrent sequences at that length"
        else:  # one at the longest: say what every slot in use leaves each
            each = self.kv_tokens // max(1, self.num_state_slots)
            allows = f", or {self.num_state_slots} concurrent sequences of {each} tokens each"
        return (
            f"cache: {self.num_blocks} KV blocks x {self.block_size} tokens = {self.kv_tokens} tokens "
            f"({g(kv)}), {self.num_state_slots} DeltaNet state slots ({g(st)}), "
            f"{self.num_checkpoint_slots} prefix-cache state checkpoints ({g(ck)}){spare}; "
            f"allows one sequence of up to {self.max_model_len} tokens{allows}"
        )


def plan_caches(
    cfg: ModelConfig,
    *,
    model_dtype,
    device,
    max_memory: str | int | None,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    block_size: int,
    max_model_len: int | None,
    enable_prefix_caching: bool,
    prefix_cache_memory: str | int | None,
    weight_bytes: int,
    num_blocks_override: int | None = None,
    working_bytes: int | None = None,
    tp: int = 1,
    extra_working_bytes: int = 0,  # e.g. the vision encoder's temporaries
    speculative: int = 0,
    kv_dtype=None,
    speculative_mtp: bool = True,
    state_dtype=None,
) -> CachePlan:
    """`working_bytes`: measured working memory (GPU: `measure_working_memory`), replacing the
    planner's formula. tp > 1: one tensor-parallel rank's caches (its shard of every KV and state
    tensor) under that rank's budget; weight_bytes is then the rank's. speculative: MTP drafts
    (engine/speculative.py), drafts per step: every running sequence has a spare state slot per
    draft, and every KV token the MTP layer's K and V as well (speculative_mtp; not for n-gram
    drafts). kv_dtype: the K/V caches' (--kv-cache-dtype; default the model's). state_dtype:
    the DeltaNet recurrent states' (--mamba-ssm-cache-dtype; default the config's, fp32)."""
    if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
        raise Qwen35Error("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
    dname = str(model_dtype).removeprefix("torch.")
    # the caches the engine allocates (one tensor-parallel rank's shard when tp > 1)
    kv_name = dname if kv_dtype is None else str(kv_dtype).removeprefix("torch.")
    spec = cache_spec(
        cfg, kv_dtype=kv_name, conv_dtype=dname, tp=tp, speculative_tokens=speculative,
        mtp=speculative_mtp,
        state_dtype=None if state_dtype is None else str(state_dtype).removeprefix("torch."),
    )
    kv_tok, st_seq = spec.kv_bytes_per_token, spec.state_bytes_per_sequence
    per_slot = spec.running_state_bytes  # a running sequence's slot (+ its spares)
    total = parse_bytes(max_memory)
    # GPU: the measured peak (measure_working_memory); else the planner's formula, model dtype
    working = working_bytes
    if working is None:
        working = working_memory_bytes(
            cfg, max_num_batched_tokens, max_num_seqs, dtype=dname, tp=tp
        )
    working += extra_working_bytes  # e.g. the vision encoder's temporaries
    if total is None:
        budget = _default_budget(device, working)
    else:
        budget = total - weight_bytes - working
        if budget <= 0:
            raise Qwen35Error(
                f"--max-memory {size_str(total)} does not cover the weights "
                f"({size_str(weight_bytes)}) and working memory ({size_str(working)}); raise it"
            )
    slots = max_num_seqs
    if st_seq and slots * per_slot > budget // 2:
        slots = max(1, (budget // 2) // per_slot)
    rest = budget - slots * per_slot
    if rest <= 0:  # (one slot is kept whatever the budget: it may not even fit)
        raise Qwen35Error(
            f"{'--max-memory ' + size_str(total) if total is not None else 'the memory'} leaves "
            f"{size_str(budget)} for caches after the weights ({size_str(weight_bytes)}) and "
            f"working memory ({size_str(working)}): not even one sequence's DeltaNet state "
            f"({size_str(per_slot)}) and a KV block; raise it, or lower --max-num-batched-tokens"
        )
    ckpts = 0
    if enable_prefix_caching and st_seq:
        pc = parse_bytes(prefix_cache_memory, "--prefix-cache-memory")
        pc = rest // 4 if pc is None else min(pc, rest // 2)
        ckpts = min(pc // st_seq, 64 + 8 * slots)  # more would rarely be reused
        rest -= ckpts * st_seq
    block_bytes = kv_tok * block_size
    num_blocks = rest // block_bytes if block_bytes else 1 << 20
    # never more than every slot at full length, twice over (room for cached prefixes)
    longest = max_model_len or cfg.max_position_embeddings
    num_blocks = min(num_blocks, 2 * slots * -(-longest // block_size))
    if num_blocks_override is not None:  # tests and experiments: an exact pool size
        num_blocks = num_blocks_override
    if num_blocks < 1:
        raise Qwen35Error(
            "no memory left for even one KV block: raise --max-memory or lower --max-num-seqs"
        )
    capacity = num_blocks * block_size
    limit = min(cfg.max_position_embeddings, capacity)
    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise Qwen35Error(
            f"--max-model-len {max_model_len:,} exceeds the model's "
            f"{cfg.max_position_embeddings:,} positions: {cfg.yarn_advice(max_model_len)}"
        )
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > capacity:
        spent = (  # where the memory went: the knobs that free some for the KV cache
            f"{'--max-memory ' + size_str(total) + ' = ' if total is not None else ''}weights "
            f"{size_str(weight_bytes)} + working memory {size_str(working)} (--max-num-batched-tokens "
            f"{max_num_batched_tokens}, --max-num-seqs {max_num_seqs}) + DeltaNet states of "
            f"{slots} sequences {size_str(slots * per_slot)} + prefix-cache state checkpoints "
            f"{size_str(ckpts * st_seq)} + KV {size_str(num_blocks * block_bytes)}"
        ) if num_blocks_override is None else f"num_kv_blocks={num_blocks}"
        raise Qwen35Error(
            f"--max-model-len {max_model_len} needs {max_model_len} KV tokens but the cache holds "
            f"{capacity} ({spent}); raise --max-memory, or lower --max-model-len, "
            "--max-num-seqs or --max-num-batched-tokens"
        )
    interval = default_checkpoint_interval(block_size)
    return CachePlan(
        num_blocks, block_size, slots, ckpts, interval, max_model_len, kv_tok, st_seq, budget,
        num_spare_slots=slots * speculative,
    )  # fmt: skip


def warn_if_caches_exceed_memory(memory: dict) -> bool:
    """A CPU engine's caches are zeroed by the OS where first touched (heap.zeros_on_touch), so
    caches larger than the machine has available start fine and are killed by the OS once
    long contexts or many sequences fill them: say so at start (the caches' figures from
    parallel.worker.rank_memory). -> whether it warned."""
    from qwen35.heap import available_memory

    free = available_memory()
    need = memory["kv_bytes"] + memory["state_bytes"]
    if free is None or need <= free:
        return False
    log.warning(
        "the caches take %s but only %s of memory is available after the weights: the system "
        "may kill the process once long contexts or many sequences fill them; lower "
        "--max-memory (or --max-model-len / --max-num-seqs)", size_str(need), size_str(free),
    )  # fmt: skip
    return True


def _default_budget(device, working: int) -> int:
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return max(0, int(free * 0.9) - working)
    return DEFAULT_CPU_CACHE_BYTES


def measure_working_memory(model, chunk_tokens: int, sampled_rows: int, block_size: int,
                           backend=None, kv_dtype=None) -> int:  # fmt: skip
    """GPU: the peak memory one forward of a fresh `chunk_tokens`-token prefill allocates above
    what is allocated now (its own small caches excluded), plus the fp32 logits of
    `sampled_rows` rows twice over (logits and the sampler's working copy). A chunk continuing a
    long context reads the paged cache in place (Triton attention), so this chunk is the peak;
    where start-up chose SDPA for such chunks, engine/preflight.py adds the K/V they gather.
    kv_dtype: the K/V caches' (--kv-cache-dtype; default the model's).
    """
    import torch

    from qwen35.engine.forward_batch import ForwardBatch, allocate_caches
    from qwen35.ops.backend import select_backend

    dev = model.device
    cfg = model.config
    T = chunk_tokens
    nb = -(-T // block_size)
    caches = allocate_caches(cfg, nb, block_size, 1, model.dtype, dev, kv_dtype=kv_dtype)
    batch = ForwardBatch.build(
        positions=range(T),
        cu_seqlens=[0, T],
        context_lens=[T],
        slot_mapping=range(T),
        block_tables=[list(range(nb))],
        state_slots=[0],
        has_initial_state=[False],
        logits_indices=[T - 1],
        device=dev,
        backend=backend or select_backend(dev, dtype=model.dtype),
    )
    ids = torch.zeros(T, dtype=torch.long, device=dev)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        model(ids, batch, caches)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del caches, batch
    torch.cuda.empty_cache()
    return int(peak) + sampled_rows * cfg.vocab_size * 4 * 2
