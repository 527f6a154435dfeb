"""The seam between the engine and KV that moves in or out of it.

vLLM V1 splits its connector API in two, and so does pdserve:
- the **scheduler side** lives in the engine (here and in scheduler.py): it knows, per
  request, how many prompt tokens its own prefix cache holds, how many arrive from outside
  (a prefill pod; later the shared KV tier) and how many are left to compute. A request
  whose KV is on its way waits in the scheduler state ``WAITING_FOR_REMOTE_KV`` with a
  deadline; a step never blocks on it.
- the **worker side** lives in kv_transfer/ (a connector backend): it owns the pod's
  ``KVMemory``, registered once at start-up, and is the only code besides the model
  forward that reads or writes cache tensors. Per request it is told block ids only.

The engine sees the worker side through the small protocols below (so engine/ imports
nothing from kv_transfer/). Block ownership is the engine's: it frees a request's blocks
only once the transfer that touches them is ``finished()`` -- after success, failure or a
cancel that the backend has drained -- so a late write can never land in reused blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class TransferHandle(Protocol):
    """One request's transfer in flight, as the engine holds it."""

    def finished(self) -> bool:
        """True once nothing will read or write the request's blocks for this transfer."""
        ...

    def cancel(self) -> None:
        """Give up on the transfer (abort, deadline, disconnect); never blocks for long.
        The blocks stay held until ``finished()``."""
        ...

    async def wait_async(self, timeout: float) -> Any:
        """Await the outcome (the backend's stats); raises KVTransferError on failure or
        timeout. Holds no thread while waiting."""
        ...


class OutboundTransfer(TransferHandle, Protocol):
    """Prefill side: KV of this pod's blocks pushed to another pod's reserved blocks."""

    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
        """Called by the forward, on the engine thread, right after ``layer``'s KV write.

        Must not copy or wait: the connector packs and sends on its own thread (on CUDA
        its own stream, after waiting on ``ready``, an event recorded on the compute stream
        after the write; None on CPU, where the write is already complete)."""
        ...


class KVReceiverPort(Protocol):
    """Decode side: the connector's receiver, attached to the engine once."""

    address: str

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> TransferHandle:
        """Register a transfer into these blocks (of the registered KVMemory), every layer.
        Raises ValueError for bad block ids or an id already in use."""
        ...


@dataclass(slots=True, frozen=True)
class RemotePlan:
    """What the decode pod reserved for a prompt whose KV a prefill pod computes."""

    block_ids: tuple[int, ...]  # the blocks the prefill pod must fill, in prompt order
    first_block: int  # index in the prompt's blocks of block_ids[0]; earlier ones are cached
    seed: int  # the request's seed: both pods draw the same random stream
    transfer: TransferHandle  # registered with the receiver; the engine holds it too


@dataclass(slots=True, frozen=True)
class KVSend:
    """A prefill-only request's outbound transfer: layers of the prompt's blocks from
    ``first_block`` on (the receiver already caches the earlier ones)."""

    transfer: OutboundTransfer
    first_block: int = 0


# -- the shared KV tier (kv_transfer/tier/engine_port.py implements these) ---------------

class TierLookup(Protocol):
    """How many leading chunks some tier level holds (a concurrent.futures.Future[int])."""

    def done(self) -> bool: ...

    def result(self, timeout: float | None = None) -> int: ...


class TierLoad(TransferHandle, Protocol):
    """Chunks read from the tier and written into a request's reserved blocks off the
    engine thread (as a connector's receiver writes them)."""

    def loaded_chunks(self) -> int:
        """Leading chunks written into their blocks (valid once ``finished()``): fewer than
        asked when a value was missing, corrupt or expired, or the load was cancelled."""
        ...


class KVTierPort(Protocol):
    """The pod's shared KV tier as the engine sees it. Every call returns at once; ``wake``
    is called (from another thread) when a look-up or load is done."""

    chunk_tokens: int

    def lookup(self, chunk_hashes: Sequence[bytes], wake: Callable[[], None]) -> TierLookup:
        ...

    def load(self, chunk_hashes: Sequence[bytes], block_ids: Sequence[int],
             wake: Callable[[], None]) -> TierLoad:
        """Read these chunks and write chunk i into ``block_ids[i*k:(i+1)*k]``."""
        ...

    def store(self, chunk_hash: bytes, block_ids: Sequence[int], *, to_redis: bool = True
              ) -> None:
        """Copy the chunk's blocks now (engine thread) and queue the write (tier threads)."""
        ...

    def holds(self, chunk_hash: bytes) -> bool:
        """Whether the host level holds the chunk (offload skips those)."""
        ...


def layer_written_hook(sends: list[tuple[str, KVSend, list[int]]], on_cuda: bool,
                       announced: set[tuple[str, int]]) -> Callable[[int], None]:
    """The forward's per-layer hook for a step's outbound transfers ((request id, send,
    the blocks it moves)): after each layer's KV write, tell each transfer. ``announced``
    holds the (request, layer) pairs told already this step: a forward retried one
    sequence at a time tells none twice."""

    def hook(layer: int) -> None:
        # One event per layer, shared by every request: the connector's stream waits on
        # it instead of this thread waiting for the write.
        ready = None
        if on_cuda:
            ready = torch.cuda.Event()
            ready.record()
        for request_id, send, blocks in sends:
            if (request_id, layer) in announced:
                continue
            announced.add((request_id, layer))
            try:
                send.transfer.layer_written(layer, blocks, ready)
            except Exception:  # the transfer then fails alone; the batch goes on
                log.exception("KV send of %s failed at layer %d", request_id, layer)
                send.transfer.cancel()

    return hook

