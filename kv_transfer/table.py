"""Receiver-side bookkeeping shared by every backend: which transfers are expected, which
layers have landed, and what happens to a frame (scatter, reject, buffer or drop).

Backends read frames off their transport and hand them to ``TransferTable.deliver`` with a
``reply`` callback that carries the outcome (ack or error) back to the sender. One lock
guards the table, and scatters happen under it: once ``cancel`` (or a timed-out ``wait``)
returns, nothing more is written into that transfer's blocks, so the caller may free them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVLayout, KVMemory
from kv_transfer.connector import PendingTransfer, TransferStats, now
from kv_transfer.wire import FrameHeader, Status, block_bytes, error_for_status, scatter_layer

log = logging.getLogger(__name__)

# (transfer_id, status, message): Status.OK acknowledges the whole transfer.
Reply = Callable[[str, Status, str], None]


@dataclass(slots=True)
class _Active:
    pending: PendingTransfer
    index: torch.Tensor  # block ids as a long tensor on the caches' device
    layout: KVLayout
    fingerprint: str  # layout.fingerprint, computed once (it hashes on every access)
    layer_bytes: int
    started: float
    index_np: np.ndarray
    received: bytearray
    count: int = 0
    bytes: int = 0
    source: object | None = None  # the connection the frames came on
    reply: Reply | None = None


@dataclass(slots=True)
class _Over:
    """A transfer id that is over; later frames for it are dropped."""

    status: Status
    reason: str
    told: bool  # has the sender been told the outcome? if not, the next frame is answered
    was_expected: bool  # False: expect() never came; a late expect() fails with ``reason``


@dataclass(slots=True)
class _Early:
    """Frames that arrived before expect(): kept (copied) for a grace period."""

    deadline: float
    source: object | None
    reply: Reply | None
    frames: list[tuple[FrameHeader, torch.Tensor]] = field(default_factory=list)
    bytes: int = 0


class TransferTable:
    def __init__(self, memory: KVMemory, *, early_grace_s: float = 5.0,
                 max_early_bytes: int = 256 << 20, remember: int = 65536) -> None:
        self.memory = memory
        self.layout = memory.layout
        self._fingerprint = memory.fingerprint
        # Writable byte views of every layer, made once: the CPU scatter's fast path.
        self._cpu_views = _cpu_views(list(memory.layers))
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._early: dict[str, _Early] = {}
        self._early_bytes = 0
        # Ids that are over (done, failed, cancelled, given up early), newest last.
        self._finished: OrderedDict[str, _Over] = OrderedDict()
        self._early_grace_s = early_grace_s
        self._max_early_bytes = max_early_bytes
        self._remember = remember
        self._closed = False

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        ids = self.memory.check_block_ids(block_ids)
        index = torch.tensor(ids, dtype=torch.long, device=self.memory.device)
        layout = self.layout
        pending = PendingTransfer(transfer_id, on_cancel=self.cancel)
        with self._lock:
            if self._closed:
                raise KVTransferError("the KV receiver is closed")
            if transfer_id in self._active:
                raise ValueError(f"transfer {transfer_id!r} is already expected")
            over = self._finished.get(transfer_id)
            if over is not None:
                if over.was_expected:
                    raise ValueError(f"transfer id {transfer_id!r} was already used")
                pending.outcome.resolve(error=error_for_status(over.status, over.reason))
                return pending
            t = _Active(pending=pending, index=index, layout=layout,
                        fingerprint=self._fingerprint, index_np=np.array(ids, dtype=np.int64),
                        layer_bytes=layout.packed_layer_bytes(len(ids)), started=now(),
                        received=bytearray(layout.num_layers))
            self._active[transfer_id] = t
            early = self._early.pop(transfer_id, None)
            if early is not None:
                self._early_bytes -= early.bytes
                for header, payload in early.frames:
                    if transfer_id not in self._active:
                        break  # an earlier buffered frame failed it
                    self._scatter(t, header, payload, early.source, early.reply)
        return pending

    def room_for(self, header: FrameHeader) -> int:
        """How many payload bytes of this DATA frame are worth reading into memory: its
        expected layer size, or what is left of the early buffer. A transport discards a
        larger payload unread and delivers None, so a peer's header cannot make the
        receiver allocate what it claims."""
        with self._lock:
            if self._closed or header.transfer_id in self._finished:
                return 0
            t = self._active.get(header.transfer_id)
            if t is not None:
                return t.layer_bytes
            return self._max_early_bytes - self._early_bytes

    def deliver(self, header: FrameHeader, payload: torch.Tensor | None, source: object | None,
                reply: Reply | None) -> None:
        """One DATA frame; ``payload`` is its bytes as a flat uint8 tensor (may be reused by
        the caller afterwards: anything kept is copied), or None if the transport discarded
        it as too large (see ``room_for``)."""
        tid = header.transfer_id
        with self._lock:
            if self._closed:
                return
            over = self._finished.get(tid)
            if over is not None:
                if not over.told:  # e.g. cancelled before the sender's first frame
                    over.told = True
                    _send(reply, tid, over.status, over.reason)
                return
            t = self._active.get(tid)
            if t is not None:
                self._scatter(t, header, payload, source, reply)
                return
            early = self._early.get(tid)
            size = header.payload_bytes
            if payload is None or self._early_bytes + size > self._max_early_bytes:
                reason = (f"transfer {tid!r}: frames arrived before expect() and the early "
                          f"buffer ({self._max_early_bytes} bytes) is full")
                self._drop_early(tid, reason, source, reply)
                return
            if early is None:
                early = _Early(deadline=now() + self._early_grace_s, source=source, reply=reply)
                self._early[tid] = early
            early.frames.append((header, payload.clone()))
            early.bytes += size
            early.source, early.reply = source, reply
            self._early_bytes += size

    def abort(self, transfer_id: str, status: Status, message: str) -> None:
        """The sender gave up (ABORT frame): fail the transfer, expected or not yet."""
        error = error_for_status(status, f"the sender aborted transfer {transfer_id!r}: "
                                         f"{message}")
        with self._lock:
            early = self._early.pop(transfer_id, None)
            if early is not None:
                self._early_bytes -= early.bytes
            t = self._active.pop(transfer_id, None)
            if t is not None:
                t.pending.outcome.resolve(error=error)
            if t is not None or transfer_id not in self._finished:
                self._over(transfer_id, status, str(error), told=True,
                           was_expected=t is not None)

    def cancel(self, transfer_id: str) -> None:
        with self._lock:
            reason = f"transfer {transfer_id!r} was cancelled by the receiver"
            early = self._early.pop(transfer_id, None)
            if early is not None:
                self._early_bytes -= early.bytes
                _send(early.reply, transfer_id, Status.CANCELLED, reason)
            t = self._active.pop(transfer_id, None)
            if t is not None:
                t.pending.outcome.resolve(error=KVTransferError(reason))
                _send(t.reply, transfer_id, Status.CANCELLED, reason)
            told = (t is not None and t.reply is not None) or early is not None
            self._over(transfer_id, Status.CANCELLED, reason, told=told,
                       was_expected=t is not None)

    def source_lost(self, source: object) -> None:
        """A sender's connection dropped: its unfinished transfers can no longer complete."""
        with self._lock:
            for tid, t in list(self._active.items()):
                if t.source is source:
                    del self._active[tid]
                    reason = (f"transfer {tid!r}: the connection from the sender was lost "
                              f"after {t.count} of {t.layout.num_layers} layers")
                    t.pending.outcome.resolve(error=KVTransferError(reason))
                    self._over(tid, Status.CLOSED, reason, told=True, was_expected=True)
            for tid, early in list(self._early.items()):
                if early.source is source:
                    self._drop_early(tid, f"transfer {tid!r}: the sender's connection was lost",
                                     None, None)

    def expire_early(self) -> None:
        """Drop buffered frames whose expect() never came within the grace period."""
        t_now = now()
        with self._lock:
            for tid, early in list(self._early.items()):
                if early.deadline < t_now:
                    self._drop_early(tid, f"transfer {tid!r}: no receiver expected it within "
                                     f"{self._early_grace_s:g}s", early.source, early.reply)

    def fail_all(self, reason: str) -> None:
        with self._lock:
            self._closed = True
            for tid, t in self._active.items():
                t.pending.outcome.resolve(error=KVTransferError(f"transfer {tid!r}: {reason}"))
                _send(t.reply, tid, Status.CLOSED, reason)
            for tid, early in self._early.items():
                _send(early.reply, tid, Status.CLOSED, reason)
            self._active.clear()
            self._early.clear()
            self._early_bytes = 0

    def _scatter(self, t: _Active, header: FrameHeader, payload: torch.Tensor | None,
                 source: object | None, reply: Reply | None) -> None:
        """Check one frame against the expected transfer, then write it (lock held)."""
        t.source, t.reply = source, reply
        tid, layout = header.transfer_id, t.layout
        problem: str | None = None
        status = Status.REJECTED
        if header.fingerprint != t.fingerprint:
            status = Status.LAYOUT_MISMATCH
            problem = (f"layout fingerprint {header.fingerprint} does not match the receiver's "
                       f"{t.fingerprint}")
        elif header.dtype != layout.dtype or header.num_layers != layout.num_layers:
            problem = (f"frame says {header.num_layers} layers of {header.dtype}, the receiver "
                       f"expects {layout.num_layers} of {layout.dtype}")
        elif (header.payload_bytes != t.layer_bytes or payload is None
              or payload.numel() != t.layer_bytes):
            problem = (f"layer of {header.payload_bytes} bytes, the receiver expects "
                       f"{t.layer_bytes} ({t.index.numel()} blocks)")
        elif t.received[header.layer]:
            problem = f"layer {header.layer} arrived twice"
        if problem is None and payload is not None:
            try:
                if self._cpu_views is not None and payload.device.type == "cpu":
                    # Per frame, skip scatter_layer's checks and views: done once up front.
                    src = payload.numpy().reshape(2, t.index_np.size, -1)
                    self._cpu_views[header.layer][:, t.index_np] = src
                else:
                    packed = payload.view(layout.torch_dtype).view(
                        layout.layer_shape(t.index.numel()))
                    scatter_layer(self.memory.layers[header.layer], t.index, packed)
            except (RuntimeError, ValueError) as exc:
                problem = f"scatter failed: {exc}"
        if problem is not None:
            message = f"transfer {tid!r} rejected: {problem}"
            err_type = LayoutMismatchError if status == Status.LAYOUT_MISMATCH else KVTransferError
            del self._active[tid]
            t.pending.outcome.resolve(error=err_type(message))
            self._over(tid, status, message, told=True, was_expected=True)
            _send(reply, tid, status, message)
            return
        t.received[header.layer] = 1
        t.count += 1
        t.bytes += t.layer_bytes
        if t.count == layout.num_layers:
            device = self.memory.device
            if device.type == "cuda":
                # The scatter ran on this thread's stream; the engine reads on its own.
                torch.cuda.synchronize(device)
            del self._active[tid]
            t.pending.outcome.resolve(stats=TransferStats(bytes=t.bytes, seconds=now() - t.started))
            self._over(tid, Status.OK, "completed", told=True, was_expected=True)
            _send(reply, tid, Status.OK, "")

    def _drop_early(self, tid: str, reason: str, source: object | None,
                    reply: Reply | None) -> None:
        early = self._early.pop(tid, None)
        if early is not None:
            self._early_bytes -= early.bytes
        self._over(tid, Status.UNKNOWN, reason, told=reply is not None, was_expected=False)
        _send(reply, tid, Status.UNKNOWN, reason)

    def _over(self, tid: str, status: Status, reason: str, *, told: bool,
              was_expected: bool) -> None:
        self._finished[tid] = _Over(status, reason, told, was_expected)
        self._finished.move_to_end(tid)
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)


def _send(reply: Reply | None, tid: str, status: Status, message: str) -> None:
    if reply is None:
        return
    try:
        reply(tid, status, message)
    except Exception:  # a reply path failing must not break the table for others
        log.exception("KV receiver could not reply for transfer %r", tid)


def _cpu_views(kv_caches: list[torch.Tensor]) -> list[np.ndarray] | None:
    views = [block_bytes(kv) for kv in kv_caches]
    return None if any(v is None for v in views) else views  # type: ignore[return-value]
