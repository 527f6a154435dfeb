"""Sender-side bookkeeping shared by every frame-based backend: one request's layers, its
outcome and its stats. A backend supplies how a packed layer leaves (``_transmit``) and how
an abort reaches the receiver (``_notify_abort``), and calls ``_acked`` / ``_rejected`` /
``_lost`` when its transport reports back. Layers are packed off the engine thread by the
sender's ``LayerPacker``.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVLayout
from kv_transfer.connector import KVTargetSpec, Outcome, SendHandle, TransferStats, now
from kv_transfer.packing import LayerPacker
from kv_transfer.wire import FrameHeader, FrameKind, Status, error_for_status


class TrackedSendHandle(SendHandle):
    """What every backend's send handle keeps alike: which layers the forward reported
    (each once, with the target's block count), when it stopped, and waiting for the
    outcome. A backend says what an accepted layer does (``layer_written``) and how it
    gives up (``_give_up``)."""

    _WAITED_FOR = "acknowledged"  # what a wait that runs out was waiting for

    def __init__(self, target: KVTargetSpec, num_layers: int) -> None:
        self.target = target
        self.num_layers = num_layers
        self.num_blocks = len(target.block_ids)
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._written = bytearray(num_layers)
        self._num_written = 0
        self._closed = False  # no more layers: wait() or cancel() was called
        self._started = now()

    @property
    def transfer_id(self) -> str:
        return self.target.transfer_id

    def _record(self, layer: int, block_ids: Sequence[int],
                accept: Callable[[], bool] = lambda: True) -> bool:
        """Check and count a written layer; True if it is to go out: the transfer has not
        failed and ``accept()`` (called under the lock, for the backend's own count of
        what still reads the blocks) agrees."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self.num_layers - 1}")
        if len(block_ids) != self.num_blocks:
            raise ValueError(f"{len(block_ids)} blocks written, the target has "
                             f"{self.num_blocks}")
        with self._lock:
            if self._closed:
                raise ValueError("layer_written() after wait() or cancel()")
            if self._written[layer]:
                raise ValueError(f"layer {layer} sent twice")
            self._written[layer] = 1
            self._num_written += 1
            return not self.outcome.done() and accept()

    @abstractmethod
    def _give_up(self, reason: str) -> None:
        """Fail the transfer (if it is not over) and tell the receiver, best effort."""

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            written = self._num_written
        if written != self.num_layers:
            self._give_up(f"the forward wrote {written} of {self.num_layers} layers")

    def wait(self, timeout: float) -> TransferStats:
        self._close()
        if not self.outcome.wait_done(timeout):
            self._give_up(f"not {self._WAITED_FOR} within {timeout:g}s")
        return self.outcome.result()

    async def wait_async(self, timeout: float) -> TransferStats:
        self._close()
        if not await self.outcome.wait_done_async(timeout):
            self._give_up(f"not {self._WAITED_FOR} within {timeout:g}s")
        return self.outcome.result()


class BaseSendHandle(TrackedSendHandle):
    def __init__(self, target: KVTargetSpec, layout: KVLayout, packer: LayerPacker) -> None:
        super().__init__(target, layout.num_layers)
        self.layout = layout
        self.layer_bytes = layout.packed_layer_bytes(self.num_blocks)
        self._packer = packer
        self._fingerprint = layout.fingerprint  # hashed on every access: compute once
        self._packing = 0  # layers queued in the packer: it may still read our blocks
        self._last_written = 0.0  # when the last layer was reported written

    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
        def accept() -> bool:
            self._last_written = now()
            self._packing += 1
            return True

        if not self._record(layer, block_ids, accept):
            return  # already failed: wait() reports why
        header = FrameHeader(
            kind=FrameKind.DATA, transfer_id=self.transfer_id, layer=layer,
            num_layers=self.layout.num_layers, payload_bytes=self.layer_bytes,
            fingerprint=self._fingerprint, dtype=self.layout.dtype,
        )

        def deliver(packed: torch.Tensor) -> None:
            self._packed()
            if not self.outcome.done():
                self._transmit(header, packed)

        def fail(exc: BaseException) -> None:
            self._packed()
            self._abort(Status.ABORTED, f"packing layer {layer} failed: {exc}")

        self._packer.submit(layer, block_ids, ready, deliver, fail)

    def _packed(self) -> None:
        with self._lock:
            self._packing -= 1

    def finished(self) -> bool:
        with self._lock:
            return self.outcome.done() and self._packing == 0

    def cancel(self) -> None:
        self._abort(Status.ABORTED, "the sender aborted the transfer")

    def _give_up(self, reason: str) -> None:
        self._abort(Status.ABORTED, reason)

    def done(self) -> bool:
        return self.outcome.done()

    def _abort(self, status: Status, reason: str) -> None:
        with self._lock:
            self._closed = True
        error = error_for_status(status, f"KV transfer {self.transfer_id!r} to "
                                         f"{self.target.address}: {reason}")
        if self.outcome.resolve(error=error):
            self._notify_abort(status, reason)

    def _acked(self) -> None:
        t = now()
        stats = TransferStats(bytes=self.layer_bytes * self.layout.num_layers,
                              seconds=t - self._started, exposed=t - self._last_written)
        self.outcome.resolve(stats=stats)

    def _rejected(self, status: Status, message: str) -> None:
        self.outcome.resolve(error=error_for_status(
            status, f"KV transfer {self.transfer_id!r} to {self.target.address} failed at the "
                    f"receiver: {message}"))

    def _lost(self, reason: str) -> None:
        self.outcome.resolve(error=KVTransferError(
            f"KV transfer {self.transfer_id!r} to {self.target.address}: {reason}"))

    @abstractmethod
    def _transmit(self, header: FrameHeader, packed: torch.Tensor) -> None:
        """Hand one DATA frame to the transport without waiting for the network (called
        on the packer thread)."""

    @abstractmethod
    def _notify_abort(self, status: Status, reason: str) -> None:
        """Tell the receiver (best effort) that this transfer is over."""


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """A packed layer as a flat uint8 tensor on its own device (no copy if contiguous)."""
    if packed.requires_grad:
        packed = packed.detach()
    return packed.contiguous().view(torch.uint8).view(-1)
