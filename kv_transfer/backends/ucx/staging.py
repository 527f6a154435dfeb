"""Packed transfers for fragmented pools: a registered staging area on each ucx end, and
descriptor lists built from block addresses.

Each descriptor costs UCX about 8-10 us however small (ENVIRONMENT.md), so a layer whose
blocks are scattered on either side -- one descriptor per block -- moves at a few GB/s. Then
the blocks go through staging: the receiver, when its reserved blocks are fragmented, grants
the transfer a slot of its staging area (``G|tid|offset``) and scatters each layer from it
into the blocks once the layer's WRITE has landed; the sender, when its blocks are
fragmented, gathers the layers it posts into a slot of its own staging area first. A slot
holds ``[layer][K, V][block]`` for the whole transfer (receiver) or for the posted layers
(sender); whatever does not fit falls back to block descriptors, which are always correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.kv_layout import KVMemory
from kv_transfer.connector import ConnectorConfig

RUNS_TO_PACK = 4  # more runs of consecutive blocks than this per layer: worth a copy
# Off unless asked for (ConnectorConfig.staging_bytes): on the CPU it measured slower than
# block descriptors (over shared memory / cma a descriptor is cheap and the extra copies are
# not; bench/RESULTS.md), and on GPUs it is not measured yet.
DEFAULT_BYTES = 0


@dataclass(slots=True)
class Staging:
    """A byte area registered with NIXL once, cut into slots first-fit (loop thread only)."""

    buffer: torch.Tensor  # uint8, on the KV cache's device
    align: int = 256
    _free: list[tuple[int, int]] = field(default_factory=list)  # (offset, size), sorted

    def __post_init__(self) -> None:
        self._free = [(0, self.buffer.numel())] if self.buffer.numel() else []

    @property
    def address(self) -> int:
        return self.buffer.data_ptr()

    @property
    def size(self) -> int:
        return self.buffer.numel()

    def alloc(self, nbytes: int) -> int | None:
        need = -(-nbytes // self.align) * self.align
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                self._free[i:i + 1] = [(offset + need, size - need)] if size > need else []
                return offset
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = -(-nbytes // self.align) * self.align
        self._free.append((offset, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, sz in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + sz)
            else:
                merged.append((off, sz))
        self._free = merged

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer[offset:offset + nbytes]


def make_staging(memory: KVMemory, config: ConnectorConfig) -> Staging:
    nbytes = DEFAULT_BYTES if config.staging_bytes is None else config.staging_bytes
    return Staging(torch.empty(nbytes, dtype=torch.uint8, device=memory.device))


def num_runs(block_ids: list[int] | tuple[int, ...]) -> int:
    if not block_ids:
        return 0
    ids = np.asarray(block_ids, dtype=np.int64)
    return 1 + int(np.count_nonzero(np.diff(ids) != 1))


def block_addresses(base: int, num_blocks: int, block_bytes: int, half: int,
                    block_ids: list[int] | tuple[int, ...]) -> np.ndarray:
    """Addresses of K (half 0) or V (half 1) of ``block_ids`` in a ``[2, N, ...]`` layer."""
    ids = np.asarray(block_ids, dtype=np.uint64)
    return np.uint64(base + half * num_blocks * block_bytes) + ids * np.uint64(block_bytes)


def packed_addresses(start: int, n: int, block_bytes: int) -> np.ndarray:
    """Addresses of ``n`` consecutive blocks from ``start`` (a staging slot's piece)."""
    return np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(block_bytes)


def pieces(src: np.ndarray, dst: np.ndarray, block_bytes: int, src_dev: int, dst_dev: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Nx3 (address, bytes, device) descriptor lists, local and remote, pairing block i of
    ``src`` with block i of ``dst``: blocks consecutive on both sides merge into one."""
    bb = np.uint64(block_bytes)
    breaks = np.flatnonzero((np.diff(src) != bb) | (np.diff(dst) != bb)) + 1
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    lengths = np.diff(np.concatenate((starts, [len(src)]))).astype(np.uint64) * bb
    local = np.stack([src[starts], lengths, np.full(len(starts), src_dev, np.uint64)], 1)
    remote = np.stack([dst[starts], lengths, np.full(len(starts), dst_dev, np.uint64)], 1)
    return local.astype(np.uint64), remote.astype(np.uint64)
