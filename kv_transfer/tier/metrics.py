"""Prometheus metrics of the shared KV tier, registered in a registry the pod passes in.

Counts are of chunks (256 tokens each) unless the name says bytes, made by loads (a look-up
only peeks); ``level`` is ``host`` or ``redis``. A corrupt value is also counted as a miss
of its level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(slots=True)
class TierMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    hits: Counter = field(init=False)
    misses: Counter = field(init=False)
    bytes: Counter = field(init=False)
    load_seconds: Histogram = field(init=False)
    store_seconds: Histogram = field(init=False)
    errors: Counter = field(init=False)
    corrupt: Counter = field(init=False)
    evictions: Counter = field(init=False)
    stores_dropped: Counter = field(init=False)
    host_bytes: Gauge = field(init=False)
    redis_up: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.hits = Counter("pdserve:kv_tier_hits", "Chunks found in a tier level",
                            ["level"], registry=r)
        self.misses = Counter("pdserve:kv_tier_misses",
                              "Chunks looked for in a tier level and not found (or corrupt)",
                              ["level"], registry=r)
        self.bytes = Counter("pdserve:kv_tier_bytes", "Value bytes read or written, per level",
                             ["level", "op"], registry=r)
        self.load_seconds = Histogram("pdserve:kv_tier_load_seconds",
                                      "Seconds per load call (all levels)", registry=r,
                                      buckets=_SECONDS)
        self.store_seconds = Histogram("pdserve:kv_tier_store_seconds",
                                       "Seconds per chunk store, per level", ["level"],
                                       registry=r, buckets=_SECONDS)
        self.errors = Counter("pdserve:kv_tier_errors",
                              "Tier operations that failed (Redis down, timeout, ...)",
                              ["level", "op"], registry=r)
        self.corrupt = Counter("pdserve:kv_tier_corrupt",
                               "Values refused by the codec, by reason", ["level", "reason"],
                               registry=r)
        self.evictions = Counter("pdserve:kv_tier_evictions",
                                 "Entries evicted from the host tier for space", ["level"],
                                 registry=r)
        self.stores_dropped = Counter("pdserve:kv_tier_stores_dropped",
                                      "Stores not made: bytes in flight at the bound, Redis "
                                      "skipped, or the tier closed", ["reason"], registry=r)
        self.host_bytes = Gauge("pdserve:kv_tier_host_bytes", "Bytes held by the host tier",
                                registry=r)
        self.redis_up = Gauge("pdserve:kv_tier_redis_up",
                              "1 while the Redis level is used, 0 while it is skipped",
                              registry=r)
