"""Sender-side bookkeeping shared by every backend: one request's layers, its outcome and
its stats. A backend supplies how a frame leaves (``_transmit``) and how an abort reaches
the receiver (``_notify_abort``), and calls ``_acked`` / ``_rejected`` / ``_lost`` when its
transport reports back.
"""

from __future__ import annotations

import threading
from abc import abstractmethod

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVLayout
from kv_transfer.connector import (
    KVTargetSpec,
    PendingTransfer,
    SendHandle,
    TransferStats,
    check_packed,
    now,
)
from kv_transfer.wire import FrameHeader, FrameKind, Status, error_for_status


class BaseSendHandle(SendHandle):
    def __init__(self, target: KVTargetSpec, layout: KVLayout) -> None:
        self.target = target
        self.layout = layout
        self.num_blocks = len(target.block_ids)
        self.layer_bytes = layout.packed_layer_bytes(self.num_blocks)
        self._fingerprint = layout.fingerprint  # hashed on every access: compute once
        self._lock = threading.Lock()
        self._sent = bytearray(layout.num_layers)
        self._num_sent = 0
        self._closed = False  # no more send_layer: finish() or abort() was called
        self._started = now()
        # The outcome reuses the decode side's one-shot result holder.
        self._outcome = PendingTransfer(target.transfer_id)

    @property
    def transfer_id(self) -> str:
        return self.target.transfer_id

    def send_layer(self, layer: int, packed: torch.Tensor) -> None:
        check_packed(packed, layer, self.layout, self.num_blocks)
        with self._lock:
            if self._closed:
                raise ValueError("send_layer() after finish() or abort()")
            if self._sent[layer]:
                raise ValueError(f"layer {layer} sent twice")
            self._sent[layer] = 1
            self._num_sent += 1
        if self._outcome.done():
            return  # already failed: finish() reports why
        header = FrameHeader(
            kind=FrameKind.DATA, transfer_id=self.transfer_id, layer=layer,
            num_layers=self.layout.num_layers, payload_bytes=self.layer_bytes,
            fingerprint=self._fingerprint, dtype=self.layout.dtype,
        )
        self._transmit(header, packed)

    def finish(self, timeout: float) -> TransferStats:
        with self._lock:
            self._closed = True
            sent = self._num_sent
        if sent != self.layout.num_layers:
            self._abort(Status.ABORTED, f"finish() after {sent} of {self.layout.num_layers} "
                                        f"layers were sent")
        if not self._outcome._event.wait(max(timeout, 0.0)):
            self._abort(Status.ABORTED, f"not acknowledged within {timeout:g}s")
        return self._outcome.wait(0)

    def abort(self) -> None:
        self._abort(Status.ABORTED, "the sender aborted the transfer")

    def done(self) -> bool:
        """True once acknowledged or failed (not part of the interface; for services)."""
        return self._outcome.done()

    def _abort(self, status: Status, reason: str) -> None:
        with self._lock:
            self._closed = True
        error = error_for_status(status, f"KV transfer {self.transfer_id!r} to "
                                         f"{self.target.address}: {reason}")
        if self._outcome._resolve(error=error):
            self._notify_abort(status, reason)

    def _acked(self) -> None:
        stats = TransferStats(bytes=self.layer_bytes * self.layout.num_layers,
                              seconds=now() - self._started)
        self._outcome._resolve(stats=stats)

    def _rejected(self, status: Status, message: str) -> None:
        self._outcome._resolve(error=error_for_status(
            status, f"KV transfer {self.transfer_id!r} to {self.target.address} failed at the "
                    f"receiver: {message}"))

    def _lost(self, reason: str) -> None:
        self._outcome._resolve(error=KVTransferError(
            f"KV transfer {self.transfer_id!r} to {self.target.address}: {reason}"))

    @abstractmethod
    def _transmit(self, header: FrameHeader, packed: torch.Tensor) -> None:
        """Hand one DATA frame to the transport without waiting for the network."""

    @abstractmethod
    def _notify_abort(self, status: Status, reason: str) -> None:
        """Tell the receiver (best effort) that this transfer is over."""


def mismatch_reason(target: KVTargetSpec, layout: KVLayout) -> str | None:
    if target.layout_fingerprint == layout.fingerprint:
        return None
    return (f"the receiver's layout fingerprint {target.layout_fingerprint} does not match "
            f"this sender's {layout.fingerprint} ({layout})")


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """A packed layer as a flat uint8 tensor on its own device (no copy if contiguous)."""
    if packed.requires_grad:
        packed = packed.detach()
    return packed.contiguous().view(torch.uint8).view(-1)
