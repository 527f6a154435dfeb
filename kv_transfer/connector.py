"""The one connector interface every KV transfer backend implements.

A backend has two ends, each built once per pod over the pod's ``KVMemory`` (its KV cache,
registered once; engine/external_kv.py describes the seam):
- decode side, ``KVReceiver``: listens at ``address``; ``expect(transfer_id, block_ids)``
  registers a transfer into reserved blocks *before* a prefill pod is asked to fill them and
  returns a ``PendingTransfer``;
- prefill side, ``KVSender``: ``begin(target)`` opens one ``SendHandle`` per request from the
  request's ``KVTargetSpec``. The forward calls ``layer_written`` as each layer's KV lands
  (engine thread: no copy, no wait); the backend packs and sends on its own thread.

Both handles resolve once, with stats or a ``KVTransferError`` (``LayoutMismatchError`` for a
layout mismatch); every wait has a timeout and is awaitable from asyncio without holding a
thread. ``finished()`` tells the engine when it may free the request's blocks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVLayout, KVMemory


@dataclass(slots=True)
class TransferStats:
    bytes: int  # payload bytes of the transfer's layers
    seconds: float  # sender: begin() to acknowledged; receiver: expect() to last layer in
    # sender only: from the moment the last layer was written (its compute done) until the
    # receiver had everything -- the part of the transfer that compute did not hide
    exposed: float = 0.0


@dataclass(slots=True, frozen=True)
class KVTargetSpec:
    """Where a prefill pod must write a request's KV (protos' KVTarget; converted in
    protos/convert.py only)."""

    connector: str  # a registered backend name
    address: str  # the receiver's address
    transfer_id: str  # the decode pod's id for this transfer (1..64 printable ASCII)
    block_ids: tuple[int, ...]  # the receiver's reserved blocks, in prompt order
    layout_fingerprint: str  # the receiver's KVLayout.fingerprint
    first_block: int = 0  # index in the prompt's blocks of block_ids[0]


@dataclass(slots=True, frozen=True)
class ConnectorConfig:
    """How a pod's connector ends are set up (flags of `pdserve prefill|decode`)."""

    host: str = "127.0.0.1"  # where a receiver listens
    port: int = 0  # 0: any free port
    advertise_host: str | None = None  # the host peers dial, when host is a wildcard
    connect_timeout_s: float = 5.0
    early_grace_s: float = 5.0  # how long frames may wait for a late expect()
    max_early_bytes: int = 256 << 20
    # The ucx backend's staging area for fragmented pools (ucx/staging.py); None: the
    # backend's default (none yet); 0: none (scattered blocks go block by block).
    staging_bytes: int | None = None
    # The shared service token (--grpc-token-file): the tcp backend's receiver admits only
    # senders that prove they hold it (an HMAC of a fresh challenge).
    token: str | None = field(default=None, repr=False)


def check_layout(fingerprint: str, layout: KVLayout) -> None:
    """The one layout check: both sides compare fingerprints before any byte moves."""
    if fingerprint != layout.fingerprint:
        raise LayoutMismatchError(
            f"KV layout mismatch: the receiver's fingerprint {fingerprint or '(none)'} is not "
            f"this pod's {layout.fingerprint} (same model, dtype and block size on both "
            f"sides? {layout})")


class Outcome:
    """A one-shot result (stats or error) set by any thread, awaited by threads or asyncio
    tasks. Backends resolve it; the first resolution wins."""

    __slots__ = ("_error", "_event", "_lock", "_stats", "_waiters")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._stats: TransferStats | None = None
        self._error: KVTransferError | None = None
        self._waiters: list[Callable[[], None]] = []

    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, stats: TransferStats | None = None,
                error: KVTransferError | None = None) -> bool:
        """Set the outcome; False if it was set already."""
        with self._lock:
            if self._event.is_set():
                return False
            self._stats, self._error = stats, error
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()
        return True

    def result(self) -> TransferStats:
        """The stats, or raise the error; only once done()."""
        if self._error is not None:
            raise self._error
        assert self._stats is not None, "result() before the outcome is set"
        return self._stats

    def wait_done(self, timeout: float) -> bool:
        return self._event.wait(max(timeout, 0.0))

    async def wait_done_async(self, timeout: float) -> bool:
        """Like ``wait_done`` from an asyncio task: no thread is held while waiting."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_set_done, fut)

        with self._lock:
            if self._event.is_set():
                return True
            self._waiters.append(wake)
        try:
            await asyncio.wait_for(fut, max(timeout, 0.0))
        except TimeoutError:
            with self._lock:
                if wake in self._waiters:
                    self._waiters.remove(wake)
            return self._event.is_set()
        return True


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class PendingTransfer:
    """Decode side handle of one expected transfer (the engine's TransferHandle).

    ``drains``: the backend's peer writes into the blocks itself (one-sided WRITEs), so a
    failed transfer is finished only once the backend calls ``mark_quiet`` (the peer said
    none of its writes is in flight, or it is presumed gone)."""

    __slots__ = ("_on_cancel", "_quiet", "outcome", "transfer_id")

    def __init__(self, transfer_id: str, on_cancel: Callable[[str], None] | None = None,
                 drains: bool = False) -> None:
        self.transfer_id = transfer_id
        self.outcome = Outcome()
        self._on_cancel = on_cancel
        self._quiet = threading.Event()
        if not drains:
            self._quiet.set()

    def done(self) -> bool:
        """True once the transfer succeeded or failed (``wait`` will not block)."""
        return self.outcome.done()

    def finished(self) -> bool:
        """Nothing writes into the blocks any more (frame-based backends stop writing the
        moment a transfer is resolved, under their lock; one-sided ones once quiet)."""
        return self.outcome.done() and self._quiet.is_set()

    def mark_quiet(self) -> None:
        self._quiet.set()

    def cancel(self) -> None:
        """Stop the transfer: it fails, and once this returns nothing more is written."""
        if self._on_cancel is not None:
            self._on_cancel(self.transfer_id)
        self.outcome.resolve(error=KVTransferError(
            f"KV transfer {self.transfer_id!r} was cancelled by the receiver"))

    def wait(self, timeout: float) -> TransferStats:
        """Stats once every layer is in the reserved blocks. Raises KVTransferError on
        timeout (which cancels the transfer), peer failure, cancel or a rejected frame."""
        if not self.outcome.wait_done(timeout):
            self._timed_out(timeout)
        return self.outcome.result()

    async def wait_async(self, timeout: float) -> TransferStats:
        if not await self.outcome.wait_done_async(timeout):
            self._timed_out(timeout)
        return self.outcome.result()

    def _timed_out(self, timeout: float) -> None:
        error = KVTransferError(f"KV transfer {self.transfer_id!r} not complete after "
                                f"{timeout:g}s")
        if self.outcome.resolve(error=error) and self._on_cancel is not None:
            self._on_cancel(self.transfer_id)  # returns once no more writes can happen


class KVReceiver(ABC):
    """Decode side end of a connector: lands incoming layers in reserved blocks."""

    address: str  # goes into KVTarget.address

    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        self.memory = memory
        self.config = config

    def peer_info(self) -> bytes:
        """What a sender needs once to reach this receiver (exchanged over the pods' gRPC
        handshake); empty when nothing is (tcp dials ``address``)."""
        return b""

    def add_peer(self, info: bytes) -> None:
        """A sender's ``peer_info``, from the handshake (to answer it directly)."""
        return  # most backends need nothing from the sender

    @abstractmethod
    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        """Register a transfer into ``block_ids`` of every layer of the registered memory.
        Frames are checked against its layout before any byte is written. Raises ValueError
        for bad block ids or a transfer id already in use."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Stop a transfer: its PendingTransfer fails and later frames for it are dropped.
        Frees nothing itself; once it returns nothing more is written."""

    @abstractmethod
    def close(self) -> None:
        """Fail every unfinished transfer and release the address."""


class SendHandle(ABC):
    """Prefill side of one request's transfer (the engine's OutboundTransfer)."""

    @abstractmethod
    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
        """``layer`` of ``block_ids`` (this pod's blocks, as many as the target's, in order)
        is written (once ``ready``, a CUDA event, has fired). Never copies or waits: the
        backend packs and sends on its own thread. Raises ValueError for a wrong layer or
        block count; a layer for a failed transfer is dropped (``wait`` says why)."""

    @abstractmethod
    def finished(self) -> bool:
        """Nothing reads the sender's blocks for this transfer any more."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up: queued layers are dropped and the receiver is told (best effort)."""

    @abstractmethod
    def wait(self, timeout: float) -> TransferStats:
        """Block until the receiver has every layer; raises KVTransferError on timeout (the
        transfer is then aborted), peer gone, or the receiver's rejection."""

    @abstractmethod
    async def wait_async(self, timeout: float) -> TransferStats:
        """``wait`` for asyncio callers, holding no thread."""


class KVSender(ABC):
    """Prefill side end of a connector."""

    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        self.memory = memory
        self.config = config

    def add_peer(self, address: str, info: bytes) -> bytes:
        """The receiver at ``address`` introduced itself (its ``peer_info``); returns what
        that receiver needs of this sender in turn (its ``add_peer``), possibly empty."""
        return b""

    def knows_peer(self, address: str) -> bool:
        """Whether a transfer to ``address`` can start (False: a handshake is due first)."""
        return True

    @abstractmethod
    def begin(self, target: KVTargetSpec) -> SendHandle:
        """Open a transfer to ``target``. Raises LayoutMismatchError (and tells the
        receiver) when its fingerprint is not this pod's layout's, ValueError for a
        malformed target."""

    @abstractmethod
    def close(self) -> None:
        """Fail unfinished transfers and drop connections."""


def check_target(target: KVTargetSpec) -> None:
    """Argument checks every sender's begin() shares (ValueError: a caller's bug)."""
    if not target.block_ids:
        raise ValueError("a KV target needs at least one block id")
    if any(b < 0 for b in target.block_ids):
        raise ValueError("block ids must be non-negative")
    if target.first_block < 0:
        raise ValueError("first_block must be non-negative")


def introduce(receiver: KVReceiver, sender: KVSender) -> None:
    """Both halves of the pods' KVHandshake in one process (benches and tests): the sender
    learns the receiver's peer info, and the receiver the sender's answer, if any."""
    info = receiver.peer_info()
    if info:
        back = sender.add_peer(receiver.address, info)
        if back:
            receiver.add_peer(back)


def now() -> float:
    return time.perf_counter()
