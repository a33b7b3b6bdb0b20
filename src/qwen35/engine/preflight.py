"""The GPU engine's start-up check: every kind of step a server meets, run once on scratch caches
through the backend the engine will serve with, before the real caches are allocated.

Triton compiles a kernel where it first runs, for that GPU, and not every GPU can build every
kernel (kernels/unavailable.py: no e4m3 before sm_89, less shared memory on smaller GPUs). Here a
kernel family that does not build is switched off, with one warning naming the kernel and
why, and its ops take the PyTorch path; without this check the first request to need it
would fail. It also compiles the kernels of each step kind, so the first requests do not wait
for Triton. The steps (two sequences of different lengths, their own blocks and state slots):

1. a fresh prefill (one sequence longer than a split-K range of the decode attention);
2. a prefill chunk that continues both (the cached-prefix attention, DeltaNet initial states,
   a MoE block of few tokens);
3. a decode step of both (split-K decode attention), then one of the short sequence alone.

Then `choose_chunk_attention` times the two ways a prefill chunk after a cached prefix can attend
(our paged Triton kernel, or the context gathered for torch's SDPA / FlashAttention) on this GPU
and keeps the faster, and `cache_sizing.measure_working_memory` measures the largest prefill
chunk with the checked backend (inside `with_fallbacks` too: its chunk may take kernels these
steps did not), plus the K/V an SDPA chunk gathers where that path was chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time

import torch

from qwen35.errors import Qwen35Error
from qwen35.ops.backend import Backend, select_backend, with_fallbacks

log = logging.getLogger("qwen35")
CHUNK_PATHS = ("triton", "sdpa")
# the timed chunk: 2,048 queries (the default chunk) after 6,144 cached tokens
CHUNK_QUERIES, CHUNK_START = 2048, 6144

LONG, SHORT = 520, 5  # prompt tokens of the two scratch sequences (LONG > 512: split-K decode)
CONTINUE = 3  # tokens of the chunk that continues each


def gpu_start(model, dtype, chunk_tokens: int, sampled_rows: int, block_size: int,
              alone: bool = True, kv_dtype=None):  # fmt: skip
    """(the backend to serve with, the working memory of the largest prefill chunk) on a GPU.
    alone=False (one tensor-parallel rank): select_backend's backend and None (the caller takes
    the planner's formula): a rank's forward all-reduces with ranks that are not running it,
    so neither the start-up steps nor the measurement can run on one rank alone. kv_dtype: the
    K/V caches' (default dtype): the steps run on caches of it (fp8 caches take the attention
    kernels' fp8 variants, which a GPU before sm_89 cannot build: the PyTorch path then)."""
    from qwen35.engine.cache_sizing import measure_working_memory

    be = select_backend(model.device, dtype=dtype)
    if not alone:
        return be, None
    be = check_kernels(model, be, block_size, kv_dtype=kv_dtype)
    be = choose_chunk_attention(model, be, dtype, block_size, kv_dtype=kv_dtype)
    be, working = with_fallbacks(
        be, lambda b: measure_working_memory(model, chunk_tokens, sampled_rows, block_size, b,
                                             kv_dtype)  # fmt: skip
    )
    if be.chunk_attention == "sdpa" and be.triton_attention:
        from qwen35.ops.attention import sdpa_gather_bytes

        working += sdpa_gather_bytes(model.config, dtype, kv_dtype)
    return be, working


def choose_chunk_attention(model, be: Backend, dtype, block_size: int,
                           queries: int = CHUNK_QUERIES, start: int = CHUNK_START,
                           kv_dtype=None) -> Backend:  # fmt: skip
    """`be` with `chunk_attention` set to the faster path on this device (`time_chunk_attention`),
    or to $QWEN35_CHUNK_ATTENTION (triton | sdpa) where set. Without our Triton attention the
    PyTorch path runs whatever this says: unchanged."""
    forced = os.environ.get("QWEN35_CHUNK_ATTENTION")
    if forced:
        if forced not in CHUNK_PATHS:
            raise Qwen35Error(f"QWEN35_CHUNK_ATTENTION={forced!r}: use one of {CHUNK_PATHS}, or "
                              "unset it to time both at start")  # fmt: skip
        return dataclasses.replace(be, chunk_attention=forced)
    if not be.triton_attention:
        return be
    times = time_chunk_attention(model.config, dtype, model.device, be, block_size, queries, start,
                                 kv_dtype=kv_dtype)  # fmt: skip
    best = min(times, key=times.get)
    log.info("prefill chunks after a cached prefix: %s; taking %s", ", ".join(
        f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), best)  # fmt: skip
    return dataclasses.replace(be, chunk_attention=best)


def time_chunk_attention(cfg, dtype, device, be: Backend, block_size: int, queries: int,
                         start: int, reps: int = 3, kv_dtype=None) -> dict[str, float]:  # fmt: skip
    """Seconds one layer's chunk of `queries` after `start` cached tokens takes on each path
    (median of `reps`, paths alternating, after one untimed call each; inf where a path raises:
    e.g. no SDPA kernel takes the bias here), random K/V in scratch caches of this model's
    attention shape."""
    from qwen35.ops.attention import cached_prefill_attention

    ctx = start + queries
    nb = -(-ctx // block_size)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (nb, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kc = torch.randn(shape, generator=g, device=device, dtype=dtype).to(kv_dtype or dtype)
    vc = torch.randn(shape, generator=g, device=device, dtype=dtype).to(kv_dtype or dtype)
    q = torch.randn(queries, cfg.num_attention_heads, cfg.head_dim, generator=g, device=device,
                    dtype=dtype)  # fmt: skip
    row = torch.arange(nb, device=device, dtype=torch.int32)
    scale = cfg.head_dim**-0.5
    runs = {p: dataclasses.replace(be, chunk_attention=p) for p in CHUNK_PATHS}
    times: dict[str, list[float]] = {p: [] for p in CHUNK_PATHS}

    def call(p):
        with torch.inference_mode():
            cached_prefill_attention(runs[p], q, kc, vc, row, start, scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for rep in range(reps + 1):
        for p in CHUNK_PATHS if rep % 2 else CHUNK_PATHS[::-1]:
            if times[p] is None:
                continue
            try:
                t0 = time.perf_counter()
                call(p)
            except Exception as e:  # noqa: BLE001 (the other path serves)
                log.info("prefill chunk path %s does not run here: %s: %s", p, type(e).__name__, e)
                times[p] = None
                continue
            if rep:
                times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(t) if t else float("inf") for p, t in times.items()}


def check_kernels(model, backend: Backend, block_size: int, long: int = LONG,
                  kv_dtype=None) -> Backend:  # fmt: skip
    """`backend` without the kernel families this GPU cannot build. `long`: tests under
    Triton's interpreter take a shorter first sequence (no split-K decode then)."""
    return with_fallbacks(backend, lambda be: run_steps(model, be, block_size, long, kv_dtype))[0]


def run_steps(model, be: Backend, block_size: int, long: int = LONG, kv_dtype=None) -> None:
    from qwen35.engine.forward_batch import ForwardBatch, allocate_caches

    cfg, dev = model.config, model.device
    final = (long + CONTINUE + 1, SHORT + CONTINUE + 2)  # context of each after the last step
    per_seq = [-(-n // block_size) for n in final]
    tables = [list(range(per_seq[0])), list(range(per_seq[0], sum(per_seq)))]
    caches = allocate_caches(cfg, sum(per_seq), block_size, 2, model.dtype, dev,
                             kv_dtype=kv_dtype)  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def step(seqs: list[tuple[int, int, int]]) -> None:
        """seqs: (sequence 0 / 1, first position, new tokens)."""
        positions, slots, cu, ctx, logits = [], [], [0], [], []
        for i, start, n in seqs:
            positions += range(start, start + n)
            slots += [tables[i][p // block_size] * block_size + p % block_size
                      for p in range(start, start + n)]  # fmt: skip
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            logits.append(cu[-1] - 1)
        batch = ForwardBatch.build(
            positions=positions, cu_seqlens=cu, context_lens=ctx, slot_mapping=slots,
            block_tables=[tables[i] for i, _, _ in seqs], state_slots=[i for i, _, _ in seqs],
            has_initial_state=[start > 0 for _, start, _ in seqs], logits_indices=logits,
            device=dev, backend=be,
        )  # fmt: skip
        ids = torch.randint(0, cfg.vocab_size, (cu[-1],), generator=gen).to(dev)
        with torch.inference_mode():
            model(ids, batch, caches)

    step([(0, 0, long), (1, 0, SHORT)])
    step([(0, long, CONTINUE), (1, SHORT, CONTINUE)])
    step([(0, long + CONTINUE, 1), (1, SHORT + CONTINUE, 1)])
    step([(1, SHORT + CONTINUE + 1, 1)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # any error of these steps surfaces here, at start-up
