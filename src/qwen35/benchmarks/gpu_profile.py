"""Where a GPU decode step's time goes: CUDA kernels per token and the GPU-busy fraction.

`profile_decode(engine, prompt, steps)` runs `steps` decode steps of one request under
torch.profiler (CPU + CUDA activities) and counts the CUDA kernels it records (kernels launched
by a CUDA graph replay are recorded too) and their summed device time. busy = kernel time /
wall time of the steps: a launch-bound step (Python and launch overhead) shows many kernels and
a low fraction; a replayed graph of memory-bound kernels approaches 1. `top_kernels`: where the
busy time goes, by kernel name (the first H200 run had only the totals: 35B-A3B busy 4.8 ms a
token against a 1.7 ms roofline, with nothing saying which kernels).
"""

from __future__ import annotations

import time

import torch

from qwen35.request import SamplingParams

TOP = 12  # kernels listed by device time


def profile_decode(engine, prompt: list[int], steps: int = 8, rid: str = "profile") -> dict:
    from torch.profiler import ProfilerActivity, profile

    k = getattr(engine.runner, "decode_steps", 1)  # tokens a step (multi-step decoding)
    sp = SamplingParams(max_tokens=(steps + 4) * k, temperature=0.0, ignore_eos=True)
    engine.add_request(rid, prompt, sp)
    for _ in range(3):  # prefill + warm decode steps
        engine.step()
    torch.cuda.synchronize()
    tokens = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.outputs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while engine.has_unfinished_requests():
        engine.step()
    engine_steps, steps = steps, max(tokens, 1)  # per token from here on
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels, busy_us = len(cuda), sum(e.time_range.elapsed_us() for e in cuda)
    top = kernels_by_time(cuda)
    spans = [(e.time_range.start, e.time_range.end, e.name[:60]) for e in cuda]
    return {
        "steps": engine_steps,
        "tokens": tokens,
        "kernels_per_token": kernels / steps,
        "gpu_busy_ms_per_token": busy_us / 1e3 / steps,
        "wall_ms_per_token": wall * 1e3 / steps,
        "gpu_busy_fraction": (busy_us / 1e6) / wall if wall else None,
        "cuda_graphs": engine.runner.graphs is not None,
        "backend": engine.runner.backend.name,
        "top_kernels": [
            {"name": n, "per_token": c / steps, "us_per_token": us / steps} for n, (c, us) in top
        ],
        **idle_gaps(spans, steps),
    }


def kernels_by_time(events, top: int = TOP) -> list[tuple[str, tuple[int, float]]]:
    """CUDA profiler events summed by kernel name: (name, (launches, us)), most time first."""
    by_name: dict[str, list] = {}
    for e in events:
        row = by_name.setdefault(e.name[:100], [0, 0.0])
        row[0] += 1
        row[1] += e.time_range.elapsed_us()
    return [(n, (c, us)) for n, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]


def idle_gaps(spans: list[tuple[float, float, str]], steps: int, top: int = 6) -> dict:
    """Where the GPU waits between kernels (start, end in us, name; any order): the idle time
    per token in gaps of 5 us or more, and the longest gaps' places (the kernels on either
    side, summed over the steps): a host sync or host work between two launches shows here."""
    spans = sorted(spans)
    places: dict[tuple[str, str], list] = {}
    idle, end = 0.0, None
    prev = ""
    for start, stop, name in spans:
        if end is not None and start - end >= 5:
            idle += start - end
            row = places.setdefault((prev, name), [0, 0.0])
            row[0] += 1
            row[1] += start - end
        if end is None or stop > end:
            end, prev = stop, name
    worst = sorted(places.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "gpu_idle_ms_per_token": idle / 1e3 / steps,
        "idle_gaps": [{"after": a, "before": b, "per_token": c / steps, "us_per_token": us / steps}
                      for (a, b), (c, us) in worst],  # fmt: skip
    }
