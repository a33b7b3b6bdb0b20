"""Prometheus metrics for `/metrics`, on a per-app CollectorRegistry (so several apps in one
process, as in the tests, don't collide in the global registry).

Request-side series (counts, tokens, latencies) are updated by the handlers; engine-side gauges
(running / waiting, KV blocks, state slots, prefix cache) are read from the engine loop's latest
`get_stats()` snapshot at scrape time by a custom collector, so they never go stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)

# get_stats() key -> (metric name, help, kind)
_ENGINE_SERIES = {
    "num_running": ("qwen35_num_requests_running", "Requests running in the engine", "gauge"),
    "num_waiting": ("qwen35_num_requests_waiting", "Requests waiting to be scheduled", "gauge"),
    "kv_blocks_used": ("qwen35_kv_blocks_used", "Paged KV blocks in use", "gauge"),
    "kv_blocks_total": ("qwen35_kv_blocks_total", "Paged KV blocks in the pool", "gauge"),
    "state_slots_used": ("qwen35_state_slots_used", "DeltaNet state slots in use", "gauge"),
    "state_slots_total": ("qwen35_state_slots_total", "DeltaNet state slots in the pool", "gauge"),
    "kv_blocks_cached": (
        "qwen35_kv_blocks_cached",
        "KV blocks holding a prefix-cache hash (in use or evictable)",
        "gauge",
    ),
    "num_preemptions": ("qwen35_num_preemptions", "Sequences preempted (recomputed)", "counter"),
    "prefix_cache_checkpoints": (
        "qwen35_prefix_cache_checkpoints",
        "DeltaNet state checkpoints held by the prefix cache",
        "gauge",
    ),
    "prefix_cache_query_tokens": (
        "qwen35_prefix_cache_query_tokens",
        "Prompt tokens looked up in the prefix cache",
        "counter",
    ),
    "prefix_cache_queries": (
        "qwen35_prefix_cache_queries",
        "Prefix cache lookups (admissions)",
        "counter",
    ),
    "prefix_cache_hits": ("qwen35_prefix_cache_hits", "Prefix cache lookups that hit", "counter"),
    "spec_drafts_total": (
        "qwen35_spec_decode_num_draft_tokens",
        "Speculative decoding: MTP draft tokens verified",
        "counter",
    ),
    "spec_accepted_total": (
        "qwen35_spec_decode_num_accepted_tokens",
        "Speculative decoding: draft tokens accepted",
        "counter",
    ),
    "prefix_cache_hit_tokens": (
        "qwen35_prefix_cache_hit_tokens",
        "Prompt tokens served from the prefix cache",
        "counter",
    ),
    "prefix_cache_disk_hits": (
        "qwen35_prefix_cache_disk_hits",
        "Prompts that took their prefix from --prefix-cache-dir",
        "counter",
    ),
    "prefix_cache_disk_hit_tokens": (
        "qwen35_prefix_cache_disk_hit_tokens",
        "Prompt tokens read from --prefix-cache-dir",
        "counter",
    ),
    "prefix_cache_disk_saves": (
        "qwen35_prefix_cache_disk_saves",
        "Prefix segments written to --prefix-cache-dir",
        "counter",
    ),
    "prefix_cache_disk_read_errors": (
        "qwen35_prefix_cache_disk_read_errors",
        "--prefix-cache-dir files that did not read back (removed)",
        "counter",
    ),
    "prefix_cache_disk_write_errors": (
        "qwen35_prefix_cache_disk_write_errors",
        "--prefix-cache-dir writes that failed",
        "counter",
    ),
    "lora_adapters_loaded": ("qwen35_lora_adapters_loaded", "LoRA adapters loaded", "gauge"),
}


class _EngineCollector:
    def __init__(self, get_stats: Callable[[], dict[str, Any]], alive: Callable[[], bool]):
        self._get_stats = get_stats
        self._alive = alive

    def collect(self) -> Iterator[Metric]:
        stats = self._get_stats() or {}
        for key, (name, help_text, kind) in _ENGINE_SERIES.items():
            if key not in stats:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, help_text, value=float(stats[key]))
        per_adapter = stats.get("lora_requests")
        if per_adapter is not None:  # {adapter name: its unfinished requests}
            g = GaugeMetricFamily("qwen35_lora_requests", "Unfinished requests per LoRA adapter",
                                  labels=["adapter"])  # fmt: skip
            for name, n in sorted(per_adapter.items()):
                g.add_metric([name], float(n))
            yield g
        yield GaugeMetricFamily(
            "qwen35_engine_alive", "1 while the engine loop runs", value=float(self._alive())
        )


class ServerMetrics:
    def __init__(
        self, get_stats: Callable[[], dict[str, Any]], alive: Callable[[], bool] = lambda: True
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "qwen35_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "qwen35_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.generation_tokens = Counter("qwen35_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "qwen35_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "qwen35_inter_token_latency_seconds", "Time between output deltas, per token",
            buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "qwen35_e2e_request_latency_seconds", "Arrival to last token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(get_stats, alive))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Latency and token bookkeeping for one HTTP request (one or more engine requests):
    call `on_output` for every delta output and `done` at the end."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first token came
        self.last: float | None = None
        self._seen: set[str] = set()
        self._cached: dict[str, int] = {}  # request id -> prompt tokens from the prefix cache
        self.num_prompt_tokens = 0
        self.num_generated = 0

    def on_output(self, out: Any) -> None:
        """`out`: a RequestOutput delta."""
        now = time.perf_counter()
        if out.request_id not in self._seen:
            self._seen.add(out.request_id)
            self.num_prompt_tokens += len(out.prompt_token_ids)
            self.m.prompt_tokens.inc(len(out.prompt_token_ids))
        cached = getattr(out, "num_cached_tokens", 0) or 0
        self._cached[out.request_id] = max(self._cached.get(out.request_id, 0), cached)
        new = sum(len(o.token_ids) for o in out.outputs)
        if new <= 0:
            return
        if self.last is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
        else:
            # n > 1 sequences advance in parallel: the latency is per step of one sequence
            steps = max(len(o.token_ids) for o in out.outputs)
            for _ in range(steps):
                self.m.itl.observe((now - self.last) / steps)
        self.last = now
        self.num_generated += new
        self.m.generation_tokens.inc(new)

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage, with `prompt_tokens_details.cached_tokens`: the prompt tokens the
        (hybrid) prefix cache served."""
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_generated,
            "total_tokens": self.num_prompt_tokens + self.num_generated,
            "prompt_tokens_details": {"cached_tokens": sum(self._cached.values())},
        }

    def done(self) -> None:
        self.m.e2e.observe(time.perf_counter() - self.start)
