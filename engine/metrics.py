"""Prometheus metrics of a pod, in a registry of its own: vLLM's names (``vllm:``) where vLLM
has the metric, ``pdserve:`` for what is pdserve's own (KV transfer, prefill decisions).

The engine's state is read when scraped (a collector, so cumulative counts such as prefix
cache hits are counters, exported with ``_total`` as vLLM does); counters and histograms of
requests and transfers are fed by the services.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.async_engine import AsyncEngine

# seconds of a request's phases on a pod (pdserve:request_phase_seconds{phase=...})
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    """The engine's load, read at scrape time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        load = self._engine.load()
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the engine",
                                value=load.running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting for blocks",
                                value=load.waiting)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc",
                                "Fraction of KV blocks in use (1 = full)",
                                value=1 - load.free_blocks / max(load.total_blocks, 1))
        yield CounterMetricFamily("vllm:prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=load.prefix_queried_tokens)
        yield CounterMetricFamily("vllm:prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache",
                                  value=load.prefix_hit_tokens)
        yield CounterMetricFamily("vllm:num_preemptions",
                                  "Sequences preempted (recomputed later) for lack of blocks",
                                  value=load.num_preemptions)


@dataclass(slots=True)
class PodMetrics:
    role: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    kv_transfer_bytes: Counter = field(init=False)
    kv_transfer_seconds: Histogram = field(init=False)
    kv_transfer_failures: Counter = field(init=False)
    kv_transfer_blocks: Counter = field(init=False)
    kv_transfer_exposed: Histogram = field(init=False)
    kv_handshakes: Counter = field(init=False)
    requests: Counter = field(init=False)
    local_prefills: Counter = field(init=False)
    prefill_decisions: Counter = field(init=False)
    phases: Histogram = field(init=False)
    port: int = 0  # where /metrics is served (0: not served); pods report it in LoadReport

    def __post_init__(self) -> None:
        r = self.registry
        self.kv_transfer_bytes = Counter(
            "pdserve:kv_transfer_bytes", "KV bytes moved between pods", ["role"], registry=r)
        self.kv_transfer_seconds = Histogram(
            "pdserve:kv_transfer_seconds", "Seconds per request's KV transfer", ["role"],
            registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.kv_transfer_blocks = Counter(
            "pdserve:kv_transfer_blocks", "KV blocks moved between pods (all layers of each)",
            ["role"], registry=r)
        self.kv_transfer_exposed = Histogram(
            "pdserve:kv_transfer_exposed_seconds",
            "Seconds of a request's KV transfer after its last layer was computed", ["role"],
            registry=r, buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                 0.25, 0.5, 1, 2.5))
        self.kv_handshakes = Counter(
            "pdserve:kv_handshakes", "KV connector handshakes made (decode) or answered "
            "(prefill): one per pair of pods, more only when a pod restarts", ["role"],
            registry=r)
        self.kv_transfer_failures = Counter(
            "pdserve:kv_transfer_failures", "KV transfers that failed", ["role"], registry=r)
        self.requests = Counter(
            "pdserve:requests", "Requests served, by outcome", ["role", "outcome"], registry=r)
        self.local_prefills = Counter(
            "pdserve:local_prefills", "Prompts a decode pod prefilled itself", registry=r)
        self.prefill_decisions = Counter(
            "pdserve:prefill_decisions",
            "Where a decode pod had each prompt prefilled: remote (a prefill pod) or local",
            ["decision"], registry=r)
        self.phases = Histogram(
            "pdserve:request_phase_seconds",
            "Seconds of each phase of a request on this pod", ["role", "phase"], registry=r,
            buckets=PHASE_BUCKETS)

    def watch_engine(self, engine: AsyncEngine) -> None:
        self.registry.register(_EngineCollector(engine))

    def watch_prefill_queue(self, outstanding_tokens: Callable[[], int]) -> None:
        """A prefill pod's queue, in the unit its work is measured in (what its autoscaler
        reads): prompt tokens accepted and not yet computed and sent."""
        Gauge("pdserve:outstanding_prefill_tokens",
              "Prompt tokens accepted and not yet prefilled and sent",
              registry=self.registry).set_function(outstanding_tokens)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``port`` (0: any free one); returns the port, 0 if off (-1)."""
        if port < 0:
            return 0
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(server.server_address[1])
        return self.port

    def record_transfer(self, nbytes: int, seconds: float, blocks: int,
                        exposed: float | None = None) -> None:
        self.kv_transfer_bytes.labels(self.role).inc(nbytes)
        self.kv_transfer_blocks.labels(self.role).inc(blocks)
        if exposed is not None:
            self.kv_transfer_exposed.labels(self.role).observe(exposed)
        self.kv_transfer_seconds.labels(self.role).observe(seconds)

    def phase(self, name: str, seconds: float) -> None:
        self.phases.labels(self.role, name).observe(max(seconds, 0.0))
