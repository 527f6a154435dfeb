"""Sender-side bookkeeping shared by every frame-based backend: one request's layers, its
outcome and its stats. A backend supplies how a packed layer leaves (``_transmit``) and how
an abort reaches the receiver (``_notify_abort``), and calls ``_acked`` / ``_rejected`` /
``_lost`` when its transport reports back. Layers are packed off the engine thread by the
sender's ``LayerPacker``.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVLayout
from kv_transfer.connector import KVTargetSpec, Outcome, SendHandle, TransferStats, now
from kv_transfer.packing import LayerPacker
from kv_transfer.wire import FrameHeader, FrameKind, Status, error_for_status


class BaseSendHandle(SendHandle):
    def __init__(self, target: KVTargetSpec, layout: KVLayout, packer: LayerPacker) -> None:
        self.target = target
        self.layout = layout
        self.num_blocks = len(target.block_ids)
        self.layer_bytes = layout.packed_layer_bytes(self.num_blocks)
        self._packer = packer
        self._fingerprint = layout.fingerprint  # hashed on every access: compute once
        self._lock = threading.Lock()
        self._sent = bytearray(layout.num_layers)
        self._num_sent = 0
        self._packing = 0  # layers queued in the packer: it may still read our blocks
        self._closed = False  # no more layers: wait() or cancel() was called
        self._started = now()
        self._last_written = 0.0  # when the last layer was reported written
        self.outcome = Outcome()

    @property
    def transfer_id(self) -> str:
        return self.target.transfer_id

    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self.layout.num_layers - 1}")
        if len(block_ids) != self.num_blocks:
            raise ValueError(f"{len(block_ids)} blocks written, the target has "
                             f"{self.num_blocks}")
        with self._lock:
            if self._closed:
                raise ValueError("layer_written() after wait() or cancel()")
            if self._sent[layer]:
                raise ValueError(f"layer {layer} sent twice")
            self._sent[layer] = 1
            self._num_sent += 1
            self._last_written = now()
            if self.outcome.done():
                return  # already failed: wait() reports why
            self._packing += 1
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

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            sent = self._num_sent
        if sent != self.layout.num_layers:
            self._abort(Status.ABORTED, f"the forward wrote {sent} of "
                                        f"{self.layout.num_layers} layers")

    def wait(self, timeout: float) -> TransferStats:
        self._close()
        if not self.outcome.wait_done(timeout):
            self._abort(Status.ABORTED, f"not acknowledged within {timeout:g}s")
        return self.outcome.result()

    async def wait_async(self, timeout: float) -> TransferStats:
        self._close()
        if not await self.outcome.wait_done_async(timeout):
            self._abort(Status.ABORTED, f"not acknowledged within {timeout:g}s")
        return self.outcome.result()

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
