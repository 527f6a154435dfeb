"""A pod's shared KV tier from its flags: ``--kv-tier host`` (the default: host memory only),
``redis://...`` / ``rediss://...`` (host memory in front of Redis, AUTH from the URL or
``$PDSERVE_KV_TIER_PASSWORD``, TLS files by flag) or ``none``. Its metrics join the pod's
/metrics registry."""

from __future__ import annotations

import argparse
import os
from urllib.parse import quote, urlsplit, urlunsplit

from engine.async_engine import AsyncEngine
from engine.metrics import PodMetrics
from kv_transfer.tier import ChunkSpec, KVTier, RedisTierConfig, TierConfig, TierMetrics
from kv_transfer.tier.engine_port import TierPort

PASSWORD_ENV = "PDSERVE_KV_TIER_PASSWORD"


def add_kv_tier_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("shared KV tier")
    g.add_argument("--kv-tier", default="host",
                   help="host (host memory in this pod), redis://[:password@]host:port/db or "
                        "rediss://... (host memory in front of Redis), or none")
    g.add_argument("--kv-tier-host-bytes", type=int, default=1 << 30,
                   help="bytes of KV chunks the host level keeps (LRU)")
    g.add_argument("--kv-tier-ttl", type=int, default=3600,
                   help="seconds a chunk lives in Redis (every value expires)")
    g.add_argument("--kv-tier-timeout", type=float, default=10.0,
                   help="seconds a prompt may wait for its chunks before computing them")
    g.add_argument("--kv-tier-connect-timeout", type=float, default=2.0,
                   help="seconds to connect to Redis (while it is down it is skipped)")
    g.add_argument("--kv-tier-ca-file", default=None, help="rediss://: the server's CA")
    g.add_argument("--kv-tier-cert-file", default=None, help="rediss://: client certificate")
    g.add_argument("--kv-tier-key-file", default=None, help="rediss://: client key")


def _with_password(url: str) -> str:
    """The URL with $PDSERVE_KV_TIER_PASSWORD as its password, unless it has one (a
    password in an environment variable stays out of ``ps``)."""
    password = os.environ.get(PASSWORD_ENV)
    parts = urlsplit(url)
    if not password or parts.password:
        return url
    user = quote(parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def tier_config(args: argparse.Namespace) -> TierConfig | None:
    """None for ``--kv-tier none``; ValueError for a bad value."""
    choice = args.kv_tier
    if choice == "none":
        return None
    redis = None
    if choice != "host":
        redis = RedisTierConfig(
            _with_password(choice), ttl_s=args.kv_tier_ttl,
            connect_timeout_s=args.kv_tier_connect_timeout, ca_file=args.kv_tier_ca_file,
            cert_file=args.kv_tier_cert_file, key_file=args.kv_tier_key_file)
    if args.kv_tier_host_bytes < 0:
        raise ValueError("--kv-tier-host-bytes cannot be negative")
    return TierConfig(host_bytes=args.kv_tier_host_bytes, redis=redis)


def start_kv_tier(args: argparse.Namespace, engine: AsyncEngine, metrics: PodMetrics
                  ) -> TierPort | None:
    config = tier_config(args)
    if config is None:
        return None
    tier = KVTier(ChunkSpec(engine.layout), config, TierMetrics(metrics.registry))
    port = TierPort(tier, engine.kv_memory)
    engine.attach_kv_tier(port, args.kv_tier_timeout)
    return port
