"""``KVTier``: the shared KV tier's one interface over two levels, host memory then Redis.

Every call is safe from any thread and returns at once; the I/O runs on the tier's own
asyncio loop in a daemon thread:

- ``lookup(chunk_hashes)`` -> future of how many leading chunks some level holds (host
  presence, then one pipelined EXISTS round trip to Redis for the rest).
- ``load(chunk_hashes)`` -> future of the payloads of the leading chunks found and intact,
  in order, stopping at the first miss. Host first; host misses are read from Redis in
  pipelined MGETs of consecutive keys (batches bounded by the bytes-in-flight budget), each
  value checked by the codec; a Redis hit is also put in the host tier. A corrupt value, an
  expired key, an unreachable Redis or a timeout end the run there: the caller computes the
  rest. The future never fails.
- ``submit_store(chunk_hash, layers)`` -> True if queued: encoding (the device-to-host
  copy and the checksum) and the writes (host tier, then Redis with a TTL) happen on the
  tier's threads; False, counted, when the bytes in flight are at their bound. A store is
  never waited on by a request.
- ``lookup_async`` / ``load_async`` await the same from any other asyncio loop (a pod's
  gRPC loop).

The engine copies a loaded payload into its own blocks on its own thread
(``codec.scatter_chunk``), so the tier never touches KV memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.prefix_hash import HASH_BYTES
from kv_transfer.aio import LoopThread
from kv_transfer.tier.budget import ByteBudget
from kv_transfer.tier.codec import ChunkSpec, CorruptValue, decode_value, encode_value
from kv_transfer.tier.host import HostTier
from kv_transfer.tier.metrics import TierMetrics
from kv_transfer.tier.redis_level import RedisLevel, RedisTierConfig

log = logging.getLogger(__name__)

Payload = memoryview
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TierConfig:
    host_bytes: int = 1 << 30  # the host tier's budget; 0 = no host level
    redis: RedisTierConfig | None = None  # None = no Redis level (the one-machine default)
    max_inflight_bytes: int = 256 << 20  # loads and stores being read, encoded or written
    max_concurrency: int = 8  # Redis operations and encodes at once
    wait_timeout_s: float = 30.0  # longest a load waits for room in the bytes budget
    encode_threads: int = 2


class KVTier:
    def __init__(self, spec: ChunkSpec, config: TierConfig, metrics: TierMetrics) -> None:
        self.spec = spec
        self.config = config
        self.metrics = metrics
        self.host = (HostTier(config.host_bytes, on_evict=self._count_evictions)
                     if config.host_bytes > 0 else None)
        self.redis = RedisLevel(config.redis, spec.fingerprint) if config.redis else None
        self.metrics.redis_up.set(1 if self.redis else 0)
        self.budget = ByteBudget(config.max_inflight_bytes)
        self._io = LoopThread("kv-tier-io")
        self._encoder = concurrent.futures.ThreadPoolExecutor(config.encode_threads,
                                                              thread_name_prefix="kv-tier-enc")
        # pinned staging buffers for device KV, one per encoder thread at most, made on
        # first use (pinned memory is costly to allocate: never per chunk)
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._sem = self._io.run(self._make_semaphore(config.max_concurrency), timeout=5)
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False

    @staticmethod
    async def _make_semaphore(n: int) -> asyncio.Semaphore:
        return asyncio.Semaphore(n)  # made on the I/O loop, where it is used

    def _count_evictions(self, n: int) -> None:
        self.metrics.evictions.labels("host").inc(n)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._io.loop)

    # -- public interface --------------------------------------------------------------

    def _submit_or(self, coro: Coroutine[Any, Any, T], default: T
                   ) -> concurrent.futures.Future[T]:
        if not self._closed:
            try:
                return self._submit(coro)
            except RuntimeError:  # the loop stopped under us (closing)
                pass
        coro.close()
        return _done(default)

    def lookup(self, chunk_hashes: Sequence[bytes]) -> concurrent.futures.Future[int]:
        return self._submit_or(self._lookup(list(chunk_hashes)), 0)

    def load(self, chunk_hashes: Sequence[bytes], max_chunks: int | None = None
             ) -> concurrent.futures.Future[list[Payload]]:
        hashes = list(chunk_hashes)[:max_chunks] if max_chunks is not None else list(chunk_hashes)
        return self._submit_or(self._load(hashes), [])

    async def lookup_async(self, chunk_hashes: Sequence[bytes]) -> int:
        return await asyncio.wrap_future(self.lookup(chunk_hashes))

    async def load_async(self, chunk_hashes: Sequence[bytes], max_chunks: int | None = None
                         ) -> list[Payload]:
        return await asyncio.wrap_future(self.load(chunk_hashes, max_chunks))

    def submit_store(self, chunk_hash: bytes, layers: Sequence[torch.Tensor], *,
                     to_redis: bool = True) -> bool:
        """Queue one chunk for storing. ``layers`` are its packed layers (``pack_chunk``),
        fresh tensors that nothing writes to any more. ``to_redis=False`` keeps it in the
        host tier only (offload of blocks the pod evicts: Redis had them at prefill)."""
        spec = self.spec
        # A wrong shape is the caller's bug: say so now, not in a log line of another thread.
        if (len(chunk_hash) != HASH_BYTES or len(layers) != spec.layout.num_layers
                or any(tuple(t.shape) != spec.layer_shape or t.dtype != spec.layout.torch_dtype
                       for t in layers)):
            raise ValueError(f"a chunk is a 16-byte hash and {spec.layout.num_layers} layers "
                             f"of {spec.layer_shape} {spec.layout.dtype}")
        size = spec.value_bytes
        if self._closed:
            self.metrics.stores_dropped.labels("closed").inc()
            return False
        if not self.budget.try_acquire(size):
            self.metrics.stores_dropped.labels("budget").inc()
            return False
        with self._idle:
            self._pending += 1
        coro = self._store(chunk_hash, list(layers), size, to_redis)
        try:
            self._submit(coro)
        except RuntimeError:  # the loop is gone (closing)
            coro.close()
            self.budget.release(size)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            self.metrics.stores_dropped.labels("closed").inc()
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every queued store is written (or failed); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        if self.redis is not None:
            try:
                self._io.run(self.redis.close(), timeout)
            except Exception:
                log.debug("closing the KV tier's Redis level failed", exc_info=True)
        self._io.stop(timeout)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    # -- on the I/O loop ----------------------------------------------------------------

    def _redis_usable(self) -> RedisLevel | None:
        if self.redis is None:
            return None
        if not self.redis.breaker.allow():
            self.metrics.redis_up.set(0)
            return None
        return self.redis

    def _redis_failed(self, op: str, exc: BaseException) -> None:
        self.metrics.errors.labels("redis", op).inc()
        if self.redis is not None and self.redis.breaker.is_open:
            self.metrics.redis_up.set(0)
        log.debug("KV tier: Redis %s failed: %r", op, exc)

    def _redis_ok(self) -> None:
        self.metrics.redis_up.set(1)

    async def _lookup(self, hashes: list[bytes]) -> int:
        in_host = ([self.host.contains(h) for h in hashes] if self.host
                   else [False] * len(hashes))
        n_host = _leading(in_host)
        redis = self._redis_usable() if n_host < len(hashes) else None
        if redis is None:
            return n_host
        ask = [i for i in range(n_host, len(hashes)) if not in_host[i]]
        try:
            async with self._sem:
                found = await redis.present([hashes[i] for i in ask])
        except Exception as exc:
            self._redis_failed("lookup", exc)
            return n_host
        self._redis_ok()
        for i, ok in zip(ask, found, strict=False):
            in_host[i] = ok
        return _leading(in_host)

    async def _load(self, hashes: list[bytes]) -> list[Payload]:
        t0 = time.perf_counter()
        out: list[Payload] = []
        try:
            await self._load_into(hashes, out)
        except Exception:
            log.exception("KV tier: load failed after %d chunks", len(out))
        self.metrics.load_seconds.observe(time.perf_counter() - t0)
        return out

    async def _load_into(self, hashes: list[bytes], out: list[Payload]) -> None:
        m, spec, i = self.metrics, self.spec, 0
        batch = max(1, self.config.max_inflight_bytes // spec.value_bytes)
        while i < len(hashes):
            payload = self._host_get(hashes[i])
            if payload is not None:
                out.append(payload)
                i += 1
                continue
            # a run of host misses, read from Redis in one MGET
            j = i + 1
            while (j < len(hashes) and j - i < batch
                   and not (self.host and self.host.contains(hashes[j]))):
                j += 1
            if self.host:
                m.misses.labels("host").inc(j - i - 1)  # hashes[i]'s was counted in _host_get
            redis = self._redis_usable()
            if redis is None:
                return
            nbytes = (j - i) * spec.value_bytes
            await self.budget.acquire(nbytes, self.config.wait_timeout_s)
            try:
                async with self._sem:
                    values = await redis.mget(hashes[i:j], spec.value_bytes)
            except Exception as exc:
                self._redis_failed("load", exc)
                return
            finally:
                self.budget.release(nbytes)
            self._redis_ok()
            for h, value in zip(hashes[i:j], values, strict=False):
                if value is None:  # never stored, evicted, or expired since the look-up
                    m.misses.labels("redis").inc()
                    return
                try:
                    payload = decode_value(spec, h, value)
                except CorruptValue as exc:
                    m.corrupt.labels("redis", exc.reason.value).inc()
                    m.misses.labels("redis").inc()
                    log.warning("KV tier: %s under %s", exc, redis.key(h))
                    return
                m.hits.labels("redis").inc()
                m.bytes.labels("redis", "load").inc(len(value))
                out.append(payload)
                if self.host is not None:
                    self.host.put(h, value)
                    m.host_bytes.set(self.host.used_bytes)
            i = j

    def _host_get(self, chunk_hash: bytes) -> Payload | None:
        if self.host is None:
            return None
        value = self.host.get(chunk_hash)
        if value is not None:
            try:
                # Host values were checked on their way in; the header check is cheap.
                payload = decode_value(self.spec, chunk_hash, value, verify_checksum=False)
            except CorruptValue as exc:
                self.metrics.corrupt.labels("host", exc.reason.value).inc()
                self.host.discard(chunk_hash)
            else:
                self.metrics.hits.labels("host").inc()
                self.metrics.bytes.labels("host", "load").inc(len(value))
                return payload
        self.metrics.misses.labels("host").inc()
        return None

    def _encode(self, chunk_hash: bytes, layers: list[torch.Tensor]) -> memoryview:
        """On an encoder thread: the chunk's value, device layers through pinned memory."""
        if not layers or layers[0].device.type != "cuda":
            return encode_value(self.spec, chunk_hash, layers)
        try:
            staging = self._staging.get_nowait()
        except queue.Empty:
            staging = torch.empty(self.spec.payload_bytes, dtype=torch.uint8, pin_memory=True)
        try:
            return encode_value(self.spec, chunk_hash, layers, staging)
        finally:
            self._staging.put(staging)

    async def _store(self, chunk_hash: bytes, layers: list[torch.Tensor], size: int,
                     to_redis: bool) -> None:
        m = self.metrics
        try:
            async with self._sem:
                t0 = time.perf_counter()
                loop = asyncio.get_running_loop()
                value = await loop.run_in_executor(self._encoder, self._encode, chunk_hash,
                                                   layers)
                del layers  # the packed tensors may be device memory: let them go now
                if self.host is not None:
                    if self.host.put(chunk_hash, value):
                        m.bytes.labels("host", "store").inc(len(value))
                    m.host_bytes.set(self.host.used_bytes)
                    t1 = time.perf_counter()
                    m.store_seconds.labels("host").observe(t1 - t0)
                    t0 = t1
                if not to_redis:
                    return
                redis = self._redis_usable()
                if redis is None:
                    if self.redis is not None:
                        m.stores_dropped.labels("redis_skipped").inc()
                    return
                try:
                    await redis.set(chunk_hash, value)
                except Exception as exc:
                    self._redis_failed("store", exc)
                    return
                self._redis_ok()
                m.bytes.labels("redis", "store").inc(len(value))
                m.store_seconds.labels("redis").observe(time.perf_counter() - t0)
        except RuntimeError as exc:
            if not self._closed and "shutdown" not in str(exc):
                m.errors.labels("host", "store").inc()
                log.exception("KV tier: storing a chunk failed")
            else:  # the process or the tier is going away: the store is simply not made
                m.stores_dropped.labels("closed").inc()
        except Exception:
            m.errors.labels("host", "store").inc()
            log.exception("KV tier: storing a chunk failed")
        finally:
            self.budget.release(size)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()


def _leading(flags: Sequence[bool]) -> int:
    n = 0
    while n < len(flags) and flags[n]:
        n += 1
    return n


def _done(value: T) -> concurrent.futures.Future[T]:
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    fut.set_result(value)
    return fut
