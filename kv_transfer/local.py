"""The ``local`` backend: senders and receivers in one process (colocated mode, unit tests).

A ``LocalHub`` (created by the caller and passed to make_receiver/make_sender; there is no
module-level registry) maps addresses to receivers. ``send_layer`` scatters the packed
layer straight into the receiver's cache (one copy, any device), through the same
``TransferTable`` checks as the network backends, so both behave alike.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVLayout
from kv_transfer.connector import (
    KVReceiver,
    KVSender,
    KVTargetSpec,
    PendingTransfer,
    check_target,
)
from kv_transfer.sending import BaseSendHandle, as_bytes, mismatch_reason
from kv_transfer.table import TransferTable
from kv_transfer.wire import FrameHeader, Status


class LocalHub:
    """The in-process address book of local receivers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: dict[str, LocalReceiver] = {}
        self._next = 0

    def register(self, receiver: LocalReceiver) -> str:
        with self._lock:
            address = f"local:{self._next}"
            self._next += 1
            self._receivers[address] = receiver
            return address

    def unregister(self, address: str) -> None:
        with self._lock:
            self._receivers.pop(address, None)

    def lookup(self, address: str) -> LocalReceiver | None:
        with self._lock:
            return self._receivers.get(address)


class LocalReceiver(KVReceiver):
    def __init__(self, hub: LocalHub, *, early_grace_s: float = 5.0,
                 max_early_bytes: int = 256 << 20) -> None:
        self._hub = hub
        self._table = TransferTable(early_grace_s=early_grace_s,
                                    max_early_bytes=max_early_bytes)
        self.address = hub.register(self)

    def expect(self, transfer_id: str, kv_caches: list[torch.Tensor], block_ids: Sequence[int],
               layout: KVLayout) -> PendingTransfer:
        self._table.expire_early()
        return self._table.expect(transfer_id, kv_caches, block_ids, layout)

    def cancel(self, transfer_id: str) -> None:
        self._table.cancel(transfer_id)

    def close(self) -> None:
        self._hub.unregister(self.address)
        self._table.fail_all("the KV receiver closed")

    def _deliver(self, header: FrameHeader, payload: torch.Tensor,
                 handle: LocalSendHandle) -> None:
        self._table.expire_early()
        self._table.deliver(header, payload, handle, handle._on_reply)

    def _abort(self, transfer_id: str, status: Status, reason: str) -> None:
        self._table.abort(transfer_id, status, reason)


class LocalSendHandle(BaseSendHandle):
    def __init__(self, hub: LocalHub, target: KVTargetSpec, layout: KVLayout) -> None:
        super().__init__(target, layout)
        self._hub = hub

    def _transmit(self, header: FrameHeader, packed: torch.Tensor) -> None:
        receiver = self._hub.lookup(self.target.address)
        if receiver is None:
            self._lost(f"no local receiver at {self.target.address} (closed?)")
            return
        receiver._deliver(header, as_bytes(packed), self)

    def _notify_abort(self, status: Status, reason: str) -> None:
        receiver = self._hub.lookup(self.target.address)
        if receiver is not None:
            receiver._abort(self.transfer_id, status, reason)

    def _on_reply(self, transfer_id: str, status: Status, message: str) -> None:
        if status == Status.OK:
            self._acked()
        else:
            self._rejected(status, message)


class LocalSender(KVSender):
    def __init__(self, hub: LocalHub) -> None:
        self._hub = hub
        self._closed = False
        self._lock = threading.Lock()
        self._handles: set[LocalSendHandle] = set()

    def begin(self, target: KVTargetSpec, layout: KVLayout) -> LocalSendHandle:
        check_target(target, layout)
        if self._closed:
            raise KVTransferError("the KV sender is closed")
        handle = LocalSendHandle(self._hub, target, layout)
        reason = mismatch_reason(target, layout)
        if reason is not None:
            handle._abort(Status.LAYOUT_MISMATCH, reason)
            raise LayoutMismatchError(reason)
        with self._lock:
            # Forget handles that are over so a long-lived sender does not grow.
            self._handles = {h for h in self._handles if not h.done()}
            self._handles.add(handle)
        return handle

    def close(self) -> None:
        self._closed = True
        with self._lock:
            handles, self._handles = self._handles, set()
        for handle in handles:
            handle._abort(Status.CLOSED, "the KV sender closed")
