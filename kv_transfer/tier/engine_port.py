"""``TierPort``: the shared KV tier as the engine sees it (engine/external_kv.py's
``KVTierPort``), over a ``KVTier`` and the pod's ``KVMemory``.

Like a connector's receiver it is the worker side: it writes loaded chunks into the blocks
the engine reserved, on its own thread, and the engine keeps those blocks until the load
is ``finished()``. Stores copy the chunk's blocks on the calling (engine) thread -- the
only moment the blocks are known to hold it -- and leave encoding and writing to the tier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence

from engine.errors import KVTransferError
from engine.kv_layout import KVMemory
from kv_transfer.tier.codec import pack_chunk, scatter_chunk
from kv_transfer.tier.tier import KVTier, Payload

log = logging.getLogger(__name__)


class TierLoadHandle:
    """One request's load: the tier's read, then the scatter into its blocks."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._loaded = 0

    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def loaded_chunks(self) -> int:
        return self._loaded

    async def wait_async(self, timeout: float) -> int:
        if not await asyncio.to_thread(self._done.wait, timeout):
            raise KVTransferError("the KV tier load did not finish in time")
        return self._loaded


class TierPort:
    def __init__(self, tier: KVTier, memory: KVMemory) -> None:
        if memory.layout.fingerprint != tier.spec.fingerprint:
            raise ValueError("the KV tier was made for another KV layout")
        self.tier = tier
        self.memory = memory
        self.chunk_tokens = tier.spec.chunk_tokens
        self._k = tier.spec.blocks
        # one thread: scatters of different requests touch different blocks, and one at a
        # time keeps the copy bandwidth from competing with itself
        self._scatter = concurrent.futures.ThreadPoolExecutor(1, "kv-tier-scatter")

    def lookup(self, chunk_hashes: Sequence[bytes], wake: Callable[[], None]
               ) -> concurrent.futures.Future[int]:
        fut = self.tier.lookup(chunk_hashes)
        fut.add_done_callback(lambda _: wake())
        return fut

    def load(self, chunk_hashes: Sequence[bytes], block_ids: Sequence[int],
             wake: Callable[[], None]) -> TierLoadHandle:
        handle = TierLoadHandle()
        blocks = list(block_ids)

        def loaded(fut: concurrent.futures.Future[list[Payload]]) -> None:
            try:
                self._scatter.submit(self._write, handle, blocks, fut.result(), wake)
            except RuntimeError:  # the pod is shutting down
                handle._done.set()
                wake()

        self.tier.load(chunk_hashes).add_done_callback(loaded)
        return handle

    def _write(self, handle: TierLoadHandle, blocks: list[int], payloads: list[Payload],
               wake: Callable[[], None]) -> None:
        k = self._k
        try:
            for i, payload in enumerate(payloads):
                if handle._cancelled.is_set() or (i + 1) * k > len(blocks):
                    break
                scatter_chunk(self.tier.spec, self.memory.layers, blocks[i * k:(i + 1) * k],
                              payload)
                handle._loaded = i + 1
        except Exception:  # a bad payload is a miss from there on, never an engine failure
            self.tier.metrics.errors.labels("host", "load").inc()
            log.exception("KV tier: writing a loaded chunk into the KV cache failed")
        finally:
            handle._done.set()
            wake()

    def store(self, chunk_hash: bytes, block_ids: Sequence[int], *, to_redis: bool = True
              ) -> None:
        self.tier.submit_store(chunk_hash, pack_chunk(self.memory.layers, block_ids),
                               to_redis=to_redis)

    def holds(self, chunk_hash: bytes) -> bool:
        return self.tier.host is not None and self.tier.host.contains(chunk_hash)

    def close(self) -> None:
        self._scatter.shutdown(wait=True, cancel_futures=False)
        self.tier.close()
