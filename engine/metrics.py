"""Prometheus metrics of a pod (names modelled on vLLM's), in a registry of its own.

Gauges read the engine when scraped; counters and histograms are fed by the services.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.async_engine import AsyncEngine


@dataclass(slots=True)
class PodMetrics:
    role: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    kv_transfer_bytes: Counter = field(init=False)
    kv_transfer_seconds: Histogram = field(init=False)
    kv_transfer_failures: Counter = field(init=False)
    requests: Counter = field(init=False)
    local_prefills: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.kv_transfer_bytes = Counter(
            "pdserve:kv_transfer_bytes", "KV bytes moved between pods", ["role"], registry=r)
        self.kv_transfer_seconds = Histogram(
            "pdserve:kv_transfer_seconds", "Seconds per request's KV transfer", ["role"],
            registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.kv_transfer_failures = Counter(
            "pdserve:kv_transfer_failures", "KV transfers that failed", ["role"], registry=r)
        self.requests = Counter(
            "pdserve:requests", "Requests served, by outcome", ["role", "outcome"], registry=r)
        self.local_prefills = Counter(
            "pdserve:local_prefills", "Prompts a decode pod prefilled itself", registry=r)

    def watch_engine(self, engine: AsyncEngine) -> None:
        r = self.registry
        pool = engine.engine.pool

        def gauge(name: str, doc: str, fn) -> None:  # noqa: ANN001
            Gauge(name, doc, registry=r).set_function(fn)

        gauge("pdserve:num_requests_running", "Requests in the engine",
              lambda: engine.load().running)
        gauge("pdserve:num_requests_waiting", "Sequences waiting for blocks",
              lambda: engine.load().waiting)
        gauge("pdserve:kv_cache_usage_perc", "Fraction of KV blocks in use",
              lambda: 1 - pool.num_free / pool.num_blocks)
        gauge("pdserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
              lambda: pool.stats.queried_tokens)
        gauge("pdserve:prefix_cache_hits", "Prompt tokens found in the prefix cache",
              lambda: pool.stats.hit_tokens)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port >= 0:
            start_http_server(port, addr=host, registry=self.registry)

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.labels(self.role).inc(nbytes)
        self.kv_transfer_seconds.labels(self.role).observe(seconds)
