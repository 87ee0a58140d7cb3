"""Prometheus metrics with vLLM's names under a `kataru:` prefix, so that dashboards made for vLLM port.

Gauges are read from the engine when scraped; counters and histograms are fed as requests finish.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class EngineGauges:
    """running, waiting, KV-cache usage and the speculation counters, read from `stats()` at each scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.stats() or {}
        yield GaugeMetricFamily("kataru:num_requests_running", "Requests in the batch (prefilling or decoding).",
                                value=stats.get("running", 0) + stats.get("prefilling", 0))
        yield GaugeMetricFamily("kataru:num_requests_waiting", "Requests waiting for a row or for cache tokens.",
                                value=stats.get("waiting", 0))
        budget = stats.get("budget_tokens") or 1
        yield GaugeMetricFamily("kataru:kv_cache_usage_perc", "Share of the KV-cache token budget reserved (0-1).",
                                value=stats.get("reserved_tokens", 0) / budget)
        yield GaugeMetricFamily("kataru:kv_cache_bytes", "Bytes the KV cache holds now.",
                                value=stats.get("cache_bytes", 0))
        yield GaugeMetricFamily("kataru:kv_cache_rows", "Rows (sequences) the KV cache holds now.",
                                value=stats.get("cache_rows", 0))
        yield CounterMetricFamily("kataru:spec_decode_num_drafts", "Verifications of speculative proposals.",
                                  value=stats.get("spec_drafts", 0))
        yield CounterMetricFamily("kataru:spec_decode_num_draft_tokens", "Speculative tokens proposed and verified.",
                                  value=stats.get("spec_draft_tokens", 0))
        yield CounterMetricFamily("kataru:spec_decode_num_accepted_tokens", "Speculative tokens the model kept.",
                                  value=stats.get("spec_accepted_tokens", 0))


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineGauges(stats))
        r = self.registry
        self.prompt_tokens = Counter("kataru:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("kataru:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter("kataru:request_success", "Requests finished, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.preemptions = Counter("kataru:num_preemptions", "Requests preempted (kataru never preempts).",
                                   registry=r)
        self.prefix_queries = Counter("kataru:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter("kataru:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                   registry=r)
        self.ttft = Histogram("kataru:time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kataru:inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kataru:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("kataru:request_queue_time_seconds", "Time from arrival to a row in the batch.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_hist = Histogram("kataru:request_prompt_tokens", "Prompt tokens per request.",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.generation_hist = Histogram("kataru:request_generation_tokens", "Generated tokens per request.",
                                         buckets=TOKEN_BUCKETS, registry=r)

    def finished(self, request: Any, token_times: list[float]) -> None:
        """Record an engine request that ended (any finish reason)."""
        times = request.times
        self.request_success.labels(request.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.tokens))
        self.prompt_hist.observe(len(request.prompt))
        self.generation_hist.observe(len(request.tokens))
        self.prefix_queries.inc(len(request.prompt))
        self.prefix_hits.inc(request.reused)
        if "admitted" in times:
            self.queue.observe(times["admitted"] - times["submitted"])
        if "first_token" in times:
            self.ttft.observe(times["first_token"] - times["submitted"])
        if "finished" in times:
            self.e2e.observe(times["finished"] - times["submitted"])
        for before, after in itertools.pairwise(token_times):
            self.itl.observe(after - before)

    def render(self) -> bytes:
        return generate_latest(self.registry)
