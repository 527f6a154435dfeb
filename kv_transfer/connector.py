"""The connector interface every KV transfer backend implements, and the factories.

Decode side: a ``KVReceiver`` listens at ``address``; for each request the decode pod calls
``expect()`` with the blocks it reserved *before* asking a prefill pod to fill them, and
waits on the ``PendingTransfer``. Prefill side: a ``KVSender`` opens one ``SendHandle``
per request from the request's ``KVTargetSpec`` (protos' KVTarget), queues each layer as
soon as the forward has produced it (``send_layer``, so transfer overlaps compute) and
calls ``finish()``, which returns once the receiver acknowledged every layer.

The shape fits transports to come (UCX, NCCL): per-layer sends of possibly device tensors,
completion per request, a timeout on every wait, and failures reported as
``engine.errors.KVTransferError`` (``LayoutMismatchError`` for a layout mismatch).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVLayout


@dataclass(slots=True)
class TransferStats:
    bytes: int  # payload bytes of the packed layers
    seconds: float  # sender: begin() to acknowledged; receiver: expect() to last scatter


@dataclass(slots=True, frozen=True)
class KVTargetSpec:
    """Where a prefill pod must write a request's KV (mirrors protos' KVTarget)."""

    connector: str  # tcp | local | ucx | nccl
    address: str  # the receiver's address
    transfer_id: str  # the decode pod's id for this transfer (1..64 printable ASCII)
    block_ids: tuple[int, ...]  # the receiver's reserved blocks, in prompt order
    layout_fingerprint: str  # the receiver's KVLayout.fingerprint


class PendingTransfer:
    """Decode side handle of one expected transfer; resolved once, by the backend."""

    __slots__ = ("transfer_id", "_event", "_stats", "_error", "_lock", "_on_timeout")

    def __init__(self, transfer_id: str,
                 on_timeout: Callable[[str], None] | None = None) -> None:
        self.transfer_id = transfer_id
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._stats: TransferStats | None = None
        self._error: KVTransferError | None = None
        self._on_timeout = on_timeout

    def done(self) -> bool:
        """True once the transfer succeeded or failed (``wait`` will not block)."""
        return self._event.is_set()

    def wait(self, timeout: float) -> TransferStats:
        """Stats once every layer is scattered into the reserved blocks.

        Raises KVTransferError on timeout, peer failure, cancel or a rejected frame. A
        timeout cancels the transfer: after ``wait`` raises, nothing more is written into
        the reserved blocks, so the caller may free them.
        """
        if not self._event.wait(max(timeout, 0.0)):
            timed_out = self._resolve(error=KVTransferError(
                f"KV transfer {self.transfer_id!r} not complete after {timeout:g}s"))
            if timed_out and self._on_timeout is not None:
                self._on_timeout(self.transfer_id)  # returns once no more writes can happen
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    def _resolve(self, stats: TransferStats | None = None,
                 error: KVTransferError | None = None) -> bool:
        """Backends call this; the first resolution wins. Returns whether this one did."""
        with self._lock:
            if self._event.is_set():
                return False
            self._stats, self._error = stats, error
            self._event.set()
            return True


class KVReceiver(ABC):
    """Decode side end of a connector: scatters incoming layers into reserved blocks."""

    address: str  # goes into KVTarget.address

    @abstractmethod
    def expect(self, transfer_id: str, kv_caches: list[torch.Tensor], block_ids: Sequence[int],
               layout: KVLayout) -> PendingTransfer:
        """Register a transfer into ``kv_caches[layer][:, block_ids]`` for every layer.

        Frames are checked against ``layout`` (fingerprint, dtype, layer count, size) before
        any byte is written. Raises ValueError if the caches do not match ``layout`` or
        ``transfer_id`` is already expected.
        """

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Stop a transfer: its PendingTransfer fails and later frames for the id are
        dropped. Frees nothing itself; once it returns nothing more is written."""

    @abstractmethod
    def close(self) -> None:
        """Fail every unfinished transfer and release the address."""


class SendHandle(ABC):
    """Prefill side of one request's transfer."""

    @abstractmethod
    def send_layer(self, layer: int, packed: torch.Tensor) -> None:
        """Queue one packed layer (``pack_layer``'s output; do not modify it afterwards).

        Never waits for the network. Raises ValueError for a wrong layer index, shape or
        dtype. If the transfer already failed, the layer is dropped and ``finish`` raises.
        """

    @abstractmethod
    def finish(self, timeout: float) -> TransferStats:
        """Block until the receiver has scattered every layer; raises KVTransferError on
        timeout (the transfer is then aborted), peer gone, or the receiver's rejection."""

    @abstractmethod
    def abort(self) -> None:
        """Give up: queued layers are dropped and the receiver is told (best effort)."""


class KVSender(ABC):
    """Prefill side end of a connector."""

    @abstractmethod
    def begin(self, target: KVTargetSpec, layout: KVLayout) -> SendHandle:
        """Open a transfer to ``target``. Raises LayoutMismatchError (and tells the
        receiver) when ``target.layout_fingerprint`` is not ``layout.fingerprint``."""

    @abstractmethod
    def close(self) -> None:
        """Fail unfinished transfers and drop connections."""


def make_receiver(kind: str, host: str = "127.0.0.1", port: int = 0, *,
                  hub: object | None = None) -> KVReceiver:
    """A receiver of backend ``kind`` ("tcp" binds host:port, port 0 = any free one;
    "local" registers with ``hub``, a LocalHub)."""
    if kind == "tcp":
        from kv_transfer.tcp import TcpReceiver
        return TcpReceiver(host, port)
    if kind == "local":
        from kv_transfer.local import LocalHub, LocalReceiver
        if not isinstance(hub, LocalHub):
            raise ValueError("the local connector needs hub=LocalHub()")
        return LocalReceiver(hub)
    raise ValueError(f"unknown KV connector {kind!r} (available: tcp, local)")


def make_sender(kind: str, *, hub: object | None = None) -> KVSender:
    if kind == "tcp":
        from kv_transfer.tcp import TcpSender
        return TcpSender()
    if kind == "local":
        from kv_transfer.local import LocalHub, LocalSender
        if not isinstance(hub, LocalHub):
            raise ValueError("the local connector needs hub=LocalHub()")
        return LocalSender(hub)
    raise ValueError(f"unknown KV connector {kind!r} (available: tcp, local)")


def check_target(target: KVTargetSpec, layout: KVLayout) -> None:
    """Argument checks every sender's begin() shares (ValueError: a caller's bug)."""
    if not target.block_ids:
        raise ValueError("a KV target needs at least one block id")
    if any(b < 0 for b in target.block_ids):
        raise ValueError("block ids must be non-negative")


def check_packed(packed: torch.Tensor, layer: int, layout: KVLayout, num_blocks: int) -> None:
    if not 0 <= layer < layout.num_layers:
        raise ValueError(f"layer {layer} outside 0..{layout.num_layers - 1}")
    expected = layout.layer_shape(num_blocks)
    if tuple(packed.shape) != expected:
        raise ValueError(f"packed layer shape {tuple(packed.shape)} != {expected}")
    if packed.dtype != layout.torch_dtype:
        raise ValueError(f"packed layer dtype {packed.dtype} != {layout.torch_dtype}")


def now() -> float:
    return time.perf_counter()
