"""BlockPool: the paged KV cache's blocks -- ref counts, an LRU free list, prefix hashes.

A full block is named by a chained hash of every token before and in it, so a block
computed for one request can be reused by any later request with the same prefix. Freed
blocks keep their hash and stay reusable until the free list hands them out again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine import prefix_hash
from engine.errors import CapacityError


def hash_block(parent: bytes | None, token_ids: Seq[int], salt: bytes = b"") -> bytes:
    """Chained block hash: names the block's tokens and everything before them.

    ``salt`` is the chain's seed for a first block (``prefix_hash.chain_seed(model_id,
    cache_salt)``); empty means the unsalted default. The definition is engine/prefix_hash.py.
    """
    return prefix_hash.hash_tokens(parent or salt or prefix_hash.DEFAULT_SEED, token_ids)


def prefix_hashes(token_ids: Seq[int], block_size: int, max_blocks: int,
                  salt: bytes = b"") -> list[bytes]:
    """Chained hashes of the first ``max_blocks`` full blocks of ``token_ids`` (``salt`` as
    in ``hash_block``)."""
    return prefix_hash.block_hashes(token_ids, block_size, salt or prefix_hash.DEFAULT_SEED,
                                    max_blocks)


@dataclass(slots=True)
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
                 ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # free blocks, least recently freed first: allocation evicts the oldest cached block
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.stats = PrefixStats()
        # called with (block, its hash) just before a cached block is reused: its content is
        # still intact (the KV tier offloads it)
        self.on_evict: Callable[[int, bytes], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self.free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise CapacityError(f"need {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:  # evict its cached identity
                if self.on_evict is not None:
                    self.on_evict(block, old)
                if self.hash_to_block.get(old) == block:
                    del self.hash_to_block[old]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            out.append(block)
        # The same (least recently freed) blocks, in ascending order: a sequence's blocks
        # come back to the free list tail first, so LRU order would hand them out in
        # reverse; ascending, they form runs of consecutive ids that a KV transfer moves as
        # one descriptor (ucx) or in place (nccl) instead of block by block.
        out.sort()
        return out

    def share(self, block_ids: Seq[int]) -> None:
        """Another sequence takes a reference on these blocks (n > 1 forks)."""
        for b in block_ids:
            assert self.ref_counts[b] > 0, "sharing a free block"
            self.ref_counts[b] += 1

    def release(self, block_ids: Seq[int]) -> None:
        # Released in reverse so that a sequence's tail blocks are evicted before its head.
        for b in reversed(block_ids):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Mark a full, computed block as reusable under ``block_hash``."""
        if not self.enable_prefix_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self.hash_to_block:
            return  # the same content is cached in another block already
        self.block_hash[block_id] = block_hash
        self.hash_to_block[block_hash] = block_id

    def lookup(self, hashes: Seq[bytes]) -> list[int]:
        """The longest run of leading blocks cached under ``hashes``; takes a reference on
        each block returned (pulling free ones off the free list)."""
        found: list[int] = []
        if not self.enable_prefix_caching:
            return found
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            found.append(block)
        return found

    def peek(self, hashes: Seq[bytes]) -> int:
        """How many leading blocks are cached, without taking references."""
        n = 0
        if self.enable_prefix_caching:
            while n < len(hashes) and hashes[n] in self.hash_to_block:
                n += 1
        return n

    def count_hit(self, queried: int, hit: int) -> None:
        self.stats.queried_tokens += queried
        self.stats.hit_tokens += hit
