"""Fixtures of the KV tier suites: real redis-servers (plain, AUTH, TLS) made once per
session, a per-test key namespace (a fresh layout fingerprint), and tiers that are closed
at teardown."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, TLSFiles, make_tls_files, start_or_skip
from tier_helpers import PASSWORD

from engine.kv_layout import KVLayout
from kv_transfer.tier import ChunkSpec, KVTier, TierConfig, TierMetrics


@pytest.fixture(scope="session")
def redis_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(RedisServer(tmp_path_factory.mktemp("redis-plain")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(RedisServer(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory, tls_files: TLSFiles
              ) -> Iterator[RedisServer]:
    server = start_or_skip(RedisServer(tmp_path_factory.mktemp("redis-tls"), password=PASSWORD,
                                tls=tls_files))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``own_redis(**kwargs)`` -> a redis-server of this test's own (it may kill it)."""
    servers: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return start_or_skip(server)

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def spec() -> ChunkSpec:
    """A small bf16 layout under a model id of this test's own: its keys are its own."""
    layout = KVLayout(model_id=uuid.uuid4().hex[:16], dtype="bfloat16", block_size=16,
                      num_layers=3, num_kv_heads=2, head_dim=8)
    return ChunkSpec(layout)


@pytest.fixture
def make_tier() -> Iterator[Callable[..., KVTier]]:
    """``make_tier(spec, **TierConfig fields)`` -> a tier closed at teardown."""
    tiers: list[KVTier] = []

    def make(spec: ChunkSpec, **config: object) -> KVTier:
        tier = KVTier(spec, TierConfig(**config), TierMetrics())  # type: ignore[arg-type]
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close(timeout=5)
