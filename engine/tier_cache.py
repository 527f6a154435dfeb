"""The engine's side of the shared KV tier: what to look up, load, store and offload.

Per request, on the engine thread, never blocking a step (engine/external_kv.py's seam):
1. ``begin``: the prompt's full 256-token chunks past what the pod's own prefix cache holds
   are looked up in the tier (host presence, then one pipelined EXISTS in Redis, on the
   tier's threads). The pod-cached blocks are held; the request waits in
   WAITING_FOR_REMOTE_KV.
2. On the answer (``poll``, between steps) blocks are reserved for the chunks found and
   the tier reads and scatters them into those blocks off the engine thread.
3. Once the load is finished (or its deadline passed: then it is cancelled and its blocks
   drain like a transfer's) the blocks of the chunks that arrived intact are registered in
   the prefix cache, the rest are freed, and the request joins the waiting queue with only
   its tail left to compute. Anything missing, corrupt or late is simply recomputed.

After each step the prompt's newly computed full chunks are queued (``note_computed``) and
copied and handed to the tier after the step's outputs went out (``flush``), so a store
never delays a first token. A chunk whose last block the pool evicts is copied to the host
level first unless it holds it already (``on_evict``: offload), so a returning conversation
is a host-to-device copy, not a recompute.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, prefix_hashes
from engine.external_kv import KVTierPort, TierLoad, TierLookup
from engine.prefix_hash import blocks_per_chunk
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class TierWait:
    seq: Sequence
    hashes: list[bytes]  # block hashes of the prompt's full chunks
    first_chunk: int  # chunks before it are the pod's own cache hits (held)
    deadline: float
    lookup: TierLookup | None = None
    load: TierLoad | None = None
    blocks: list[int] = field(default_factory=list)  # reserved for the load


class TierCache:
    def __init__(self, port: KVTierPort, scheduler: Scheduler, timeout_s: float,
                 wake: Callable[[], None] | None = None) -> None:
        self.port = port
        self.scheduler = scheduler
        self.pool: BlockPool = scheduler.pool
        self.block_size = self.pool.block_size
        self.k = blocks_per_chunk(self.block_size, port.chunk_tokens)
        self.chunk_tokens = port.chunk_tokens
        self.timeout_s = timeout_s
        self.wake: Callable[[], None] = wake or (lambda: None)
        self.waits: dict[str, TierWait] = {}
        self._stores: list[tuple[bytes, list[int]]] = []
        # chunk hash -> its blocks' hashes: how an evicted chunk-ending block finds the rest
        self._chunks: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self.pool.on_evict = self.on_evict

    # -- loads -----------------------------------------------------------------------

    def begin(self, seq: Sequence) -> bool:
        """Start looking up ``seq``'s prompt chunks; True if it now waits on the tier."""
        if seq.params.prompt_logprobs is not None:  # needs every prompt row computed
            return False
        bs, k = self.block_size, self.k
        # Leave at least one token to compute: its logits give the next token.
        n_chunks = (seq.num_tokens - 1) // bs // k
        if n_chunks == 0:
            return False
        hashes = prefix_hashes(seq.token_ids, bs, n_chunks * k, seq.hash_seed)
        first = self.pool.peek(hashes) // k
        if first >= n_chunks:
            return False  # the pod's own cache has them all: the scheduler takes them
        seq.block_ids = self.pool.lookup(hashes[:first * k])
        seq.block_hashes = hashes[:first * k]
        seq.num_computed_tokens = first * k * bs
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        wait = TierWait(seq, hashes, first, time.monotonic() + self.timeout_s)
        wait.lookup = self.port.lookup(self._chunk_hashes(hashes, first, n_chunks), self.wake)
        self.waits[seq.request_id] = wait
        return True

    def _chunk_hashes(self, hashes: list[bytes], start: int, end: int) -> list[bytes]:
        return [hashes[(c + 1) * self.k - 1] for c in range(start, end)]

    def poll(self, now: float) -> None:
        """Between steps: move look-ups and loads that are done (or late) along."""
        for wait in list(self.waits.values()):
            if wait.load is None:
                assert wait.lookup is not None
                if wait.lookup.done():
                    self._start_load(wait, wait.lookup.result())
                elif now >= wait.deadline:
                    self._resume(wait, 0)
            elif wait.load.finished():
                self._resume(wait, wait.load.loaded_chunks())
            elif now >= wait.deadline:
                wait.load.cancel()
                self._resume(wait, 0)

    def _start_load(self, wait: TierWait, found: int) -> None:
        if found <= 0:
            self._resume(wait, 0)
            return
        need = found * self.k
        if not self.pool.can_allocate(need):
            self._resume(wait, 0)  # the pod is full: compute instead of evicting its cache
            return
        wait.blocks = self.pool.allocate(need)
        start = wait.first_chunk
        wait.load = self.port.load(self._chunk_hashes(wait.hashes, start, start + found),
                                   wait.blocks, self.wake)

    def _resume(self, wait: TierWait, loaded: int) -> None:
        """The request leaves the tier wait with ``loaded`` more chunks computed."""
        del self.waits[wait.seq.request_id]
        seq, k = wait.seq, self.k
        keep = loaded * k
        self._let_go(wait, wait.blocks[keep:])
        start = wait.first_chunk * k
        for i, block in enumerate(wait.blocks[:keep]):
            self.pool.register(block, wait.hashes[start + i])
        seq.block_ids.extend(wait.blocks[:keep])
        if keep == len(wait.blocks):  # a contiguous prefix so far: the pool may hold more
            # blocks past the last whole chunk (a partial chunk's), as the scheduler would take
            more = prefix_hashes(seq.token_ids, self.block_size, (seq.num_tokens - 1)
                                 // self.block_size, seq.hash_seed)
            seq.block_ids.extend(self.pool.lookup(more[len(seq.block_ids):]))
            seq.block_hashes = more[:len(seq.block_ids)]
        else:
            seq.block_hashes = wait.hashes[:len(seq.block_ids)]
        for c in range(wait.first_chunk, wait.first_chunk + loaded):
            self._remember_chunk(wait.hashes[c * k:(c + 1) * k])
        seq.num_computed_tokens = len(seq.block_ids) * self.block_size
        seq.status = SequenceStatus.WAITING
        self.scheduler.waiting.append(seq)

    def _let_go(self, wait: TierWait, blocks: list[int]) -> None:
        """Free blocks the load does not fill -- once nothing can write them any more."""
        if not blocks:
            return
        if wait.load is not None and not wait.load.finished():
            self.scheduler.draining.append((wait.load, blocks))
        else:
            self.pool.release(blocks)

    def drop(self, seq: Sequence) -> None:
        """``seq`` ends (abort) while waiting on the tier: its load is cancelled and the
        blocks it may still write drain; the caller frees the rest (``seq.block_ids``)."""
        wait = self.waits.pop(seq.request_id, None)
        if wait is None or wait.seq is not seq:
            return
        if wait.load is not None:
            wait.load.cancel()
        self._let_go(wait, wait.blocks)
        wait.blocks = []

    # -- stores and offload ------------------------------------------------------------

    def note_scheduled(self, seq: Sequence) -> None:
        """Before a step: chunks already computed (cache hits) are not stored again."""
        if seq.tier_stored < 0:
            seq.tier_stored = seq.num_computed_tokens // self.chunk_tokens

    def note_computed(self, seq: Sequence) -> None:
        """After a step: queue the prompt's chunks that are now full and computed."""
        if seq.tier_stored < 0:
            return
        full = min(seq.num_computed_tokens, seq.num_prompt_tokens) // self.chunk_tokens
        k = self.k
        for c in range(seq.tier_stored, full):
            hashes = seq.block_hashes[c * k:(c + 1) * k]
            if len(hashes) < k:
                break
            self._stores.append((hashes[-1], seq.block_ids[c * k:(c + 1) * k]))
            self._remember_chunk(hashes)
            seq.tier_stored = c + 1

    @property
    def stores_queued(self) -> bool:
        return bool(self._stores)

    def flush(self) -> None:
        """Copy the queued chunks (before any block can be reused) and hand them over."""
        stores, self._stores = self._stores, []
        for chunk_hash, blocks in stores:
            self.port.store(chunk_hash, blocks)

    def _remember_chunk(self, hashes: list[bytes]) -> None:
        self._chunks[hashes[-1]] = hashes
        self._chunks.move_to_end(hashes[-1])
        while len(self._chunks) > max(1, self.pool.num_blocks // self.k):
            self._chunks.popitem(last=False)

    def on_evict(self, block: int, block_hash: bytes) -> None:
        """The pool is about to reuse ``block`` (still intact): offload its chunk if it
        ends one whose blocks are all still cached and the host level lacks it."""
        hashes = self._chunks.pop(block_hash, None)
        if hashes is None or self.port.holds(block_hash):
            return
        blocks = [self.pool.hash_to_block.get(h) for h in hashes]
        if blocks[-1] != block or any(b is None for b in blocks):
            return
        self.port.store(block_hash, [b for b in blocks if b is not None], to_redis=False)
