"""The Redis level of the KV tier: keys, pipelined look-ups and reads, TTL'd writes, and a
circuit breaker that skips Redis while it is down.

Runs on the tier's I/O loop only (redis-py asyncio with the hiredis parser). Keys are
``pdserve:kv:v1:<layout fingerprint>:<chunk hash hex>``; each holds one whole encoded value,
so Redis evicting or expiring a key removes a chunk entirely, never part of one.

Failure policy: a connection error or a timeout opens the breaker; while open, every
operation is skipped at once (a miss, or a dropped store) so requests never wait on a dead
Redis. After a backoff (doubling, capped) one operation probes; success closes the breaker.
Every socket operation has a bounded connect and read timeout on top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

KEY_PREFIX = "pdserve:kv:v1"
T = TypeVar("T")
# Errors that mean "Redis is not reachable now" (they open the breaker); others (an OOM
# reply, a wrong type) are counted but leave Redis in use.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class RedisTierConfig:
    url: str  # redis://[[user]:password@]host:port/db or rediss://... (TLS)
    ttl_s: int = 3600  # every value expires; Redis's maxmemory policy evicts before that
    # Redis is single-threaded: while it takes in a few 32 MiB values it accepts late, and on
    # 2 busy cores a 0.5 s connect timeout tripped the breaker on a healthy server. A dead
    # local server refuses at once whatever this is; a black-holed one costs it once per probe.
    connect_timeout_s: float = 2.0
    op_timeout_s: float = 10.0  # one command, e.g. an MGET of a batch of 32 MiB values
    max_connections: int = 8
    ca_file: str | None = None  # TLS: the CA that signed the server's certificate
    cert_file: str | None = None  # TLS client certificate (when the server asks for one)
    key_file: str | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"KV tier URL must start with redis:// or rediss://, got "
                             f"{self.url!r}")
        if (self.ca_file or self.cert_file or self.key_file) and scheme != "rediss":
            raise ValueError("TLS files were given for a plain redis:// URL (use rediss://)")
        if self.ttl_s < 1 or self.max_connections < 1:
            raise ValueError("ttl_s and max_connections must be at least 1")

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"


def redis_key(fingerprint: str, chunk_hash: bytes) -> str:
    return f"{KEY_PREFIX}:{fingerprint}:{chunk_hash.hex()}"


class CircuitBreaker:
    """Closed (use Redis), open (skip it until a deadline), then one probe at a time."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._backoff = initial_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        if self._open_until is None:
            return True
        if self._probing or time.monotonic() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._open_until = None
        self._probing = False
        self._backoff = self.initial_s

    def abandon(self) -> None:
        """A call ended without telling whether Redis is up (cancelled): allow a new probe."""
        self._probing = False

    def failure(self) -> None:
        self._open_until = time.monotonic() + self._backoff
        self._probing = False
        self._backoff = min(self._backoff * 2, self.max_s)


class RedisLevel:
    def __init__(self, config: RedisTierConfig, fingerprint: str) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.breaker = CircuitBreaker(config.backoff_initial_s, config.backoff_max_s)
        kwargs: dict[str, object] = {
            "socket_connect_timeout": config.connect_timeout_s,
            "socket_timeout": config.op_timeout_s,
            "retry": Retry(NoBackoff(), 0),  # the breaker decides when to try again
            "max_connections": config.max_connections,
            "timeout": config.connect_timeout_s,  # wait for a free pooled connection
        }
        if config.tls:
            kwargs.update(ssl_ca_certs=config.ca_file, ssl_certfile=config.cert_file,
                          ssl_keyfile=config.key_file)
        pool = aioredis.BlockingConnectionPool.from_url(config.url, **kwargs)
        self.client = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))

    def key(self, chunk_hash: bytes) -> str:
        return redis_key(self.fingerprint, chunk_hash)

    async def _guarded(self, coro: Awaitable[T], timeout: float) -> T:
        """Run one Redis call; on an unreachable Redis open the breaker and drop pooled
        connections (after a restart they are all dead), then re-raise."""
        try:
            result = await asyncio.wait_for(coro, timeout)
        except UNREACHABLE as exc:
            if not self.breaker.is_open:
                log.warning("KV tier: Redis unreachable (%s: %s); skipping it for now",
                            type(exc).__name__, exc)
            self.breaker.failure()
            try:
                await self.client.connection_pool.disconnect(inuse_connections=True)
            except Exception:  # already failing: nothing more to do than say so
                log.debug("dropping the KV tier's Redis connections failed", exc_info=True)
            raise
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except Exception:
            self.breaker.success()  # an error reply means Redis answered: it is up
            raise
        self.breaker.success()
        return result

    def _budget(self, nbytes: int) -> float:
        return self.config.connect_timeout_s + self.config.op_timeout_s + nbytes / 100e6

    async def present(self, chunk_hashes: list[bytes]) -> list[bool]:
        """Which keys exist: one pipelined round trip of EXISTS per key."""
        pipe = self.client.pipeline(transaction=False)
        for h in chunk_hashes:
            pipe.exists(self.key(h))
        found = await self._guarded(pipe.execute(), self._budget(0))
        return [bool(x) for x in found]

    async def mget(self, chunk_hashes: list[bytes], value_bytes: int) -> list[bytes | None]:
        keys = [self.key(h) for h in chunk_hashes]
        got = await self._guarded(self.client.mget(keys), self._budget(value_bytes * len(keys)))
        # the client never decodes replies, so values are bytes; anything else is no value
        return [v if isinstance(v, bytes) else None for v in got]

    async def set(self, chunk_hash: bytes, value: bytes | bytearray | memoryview) -> None:
        await self._guarded(self.client.set(self.key(chunk_hash), value, ex=self.config.ttl_s),
                            self._budget(len(value)))

    async def close(self) -> None:
        try:
            await self.client.aclose()
            await self.client.connection_pool.disconnect()
        except Exception:
            log.debug("closing the KV tier's Redis client failed", exc_info=True)
