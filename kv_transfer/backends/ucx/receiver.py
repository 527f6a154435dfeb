"""The decode side of the ``ucx`` backend: reserved blocks that prefill pods WRITE into.

Nothing travels through this process: the sender's NIXL agent writes straight into the
registered KV memory. What this end does is say who may write where and when: a sender
asks (``B``) and is let in (``G``) only while the transfer is expected; each layer's WRITE
carries a notification (``D``) that NIXL delivers after its data; once every layer is in,
the sender hears ``K``. A transfer cancelled after ``G`` keeps its blocks out of reuse until
the sender confirms that none of its writes is in flight (``Q``) or ``quarantine_s`` passes.
State lives on the agent's loop thread; callers reach it through ``AgentLoop.run``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVMemory
from kv_transfer.backends.ucx.agent import AgentLoop
from kv_transfer.backends.ucx.protocol import Notif, PeerInfo, layer_span
from kv_transfer.backends.ucx.staging import RUNS_TO_PACK, make_staging, num_runs
from kv_transfer.connector import ConnectorConfig, KVReceiver, PendingTransfer, TransferStats, now
from kv_transfer.wire import Status, error_for_status

log = logging.getLogger(__name__)
_REMEMBER = 65536  # transfer ids that are over, so late notifications are recognised


@dataclass(slots=True)
class _Incoming:
    pending: PendingTransfer
    block_ids: list[int]
    started: float
    sender: str | None = None  # the agent let in (G); only its notifications count
    layers: set[int] = field(default_factory=set)
    slot: int | None = None  # its staging slot: layers land there, then are scattered
    index: torch.Tensor | None = None  # with a slot: the block ids, on the cache's device
    scattering: list[tuple[range, Any]] = field(default_factory=list)  # (layers, event)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


@dataclass(slots=True)
class _Quiescing:
    pending: PendingTransfer
    sender: str
    deadline: float
    slot: int | None = None
    slot_bytes: int = 0


class UcxReceiver(KVReceiver):
    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        self.quarantine_s = max(config.early_grace_s, 1.0)
        self._fingerprint = memory.fingerprint
        self._layer_bytes = memory.layout.block_bytes_per_layer
        self._staging = make_staging(memory, config)
        self._scatter_stream = torch.cuda.Stream(memory.device) \
            if memory.device.type == "cuda" else None
        # loop thread only:
        self._active: dict[str, _Incoming] = {}
        self._early: dict[str, tuple[str, float]] = {}  # tid -> (sender, deadline)
        self._quiescing: dict[str, _Quiescing] = {}
        self._over: OrderedDict[str, tuple[Status, str, bool]] = OrderedDict()
        self._closed = False
        self._loop = AgentLoop(f"pdserve-kv-recv-{uuid.uuid4().hex[:12]}", memory,
                               self._on_notif, self._on_tick, self._staging.buffer)
        self.address = self._loop.name
        self._info = PeerInfo.of(memory, self._loop.name, self._loop.metadata,
                                 self._staging.address, self._staging.size).encode()

    def peer_info(self) -> bytes:
        return self._info

    def add_peer(self, info: bytes) -> None:
        peer = PeerInfo.decode(info)
        self._loop.run(lambda: self._loop.agent.add_remote_agent(peer.metadata))

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        ids = self.memory.check_block_ids(block_ids)
        pending = PendingTransfer(transfer_id, on_cancel=self.cancel, drains=True)
        return self._loop.run(lambda: self._expect(transfer_id, list(ids), pending))

    def cancel(self, transfer_id: str) -> None:
        reason = f"transfer {transfer_id!r} was cancelled by the receiver"
        self._loop.run(lambda: self._fail(transfer_id, Status.CANCELLED, reason,
                                          KVTransferError(reason)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def fail_all() -> None:
            for tid in list(self._active):
                reason = f"transfer {tid!r}: the KV receiver closed"
                self._fail(tid, Status.CLOSED, reason, KVTransferError(reason))
            for q in self._quiescing.values():
                self._quiet(q)  # nothing will be reused: the memory goes away

        try:
            self._loop.run(fail_all)
        finally:
            self._loop.stop()

    # -- the loop thread --------------------------------------------------------------

    def _expect(self, tid: str, block_ids: list[int], pending: PendingTransfer
                ) -> PendingTransfer:
        if self._closed:
            raise KVTransferError("the KV receiver is closed")
        if tid in self._active:
            raise ValueError(f"transfer {tid!r} is already expected")
        over = self._over.get(tid)
        if over is not None:
            status, reason, was_expected = over
            if was_expected:
                raise ValueError(f"transfer id {tid!r} was already used")
            pending.outcome.resolve(error=error_for_status(status, reason))
            pending.mark_quiet()
            return pending
        incoming = _Incoming(pending, block_ids, now())
        self._active[tid] = incoming
        early = self._early.pop(tid, None)
        if early is not None:
            self._grant(tid, incoming, early[0])
        return pending

    def _grant(self, tid: str, incoming: _Incoming, sender: str) -> None:
        """Let ``sender`` in; scattered reserved blocks get a staging slot if one is free."""
        incoming.sender = sender
        if num_runs(incoming.block_ids) > RUNS_TO_PACK:
            incoming.slot = self._staging.alloc(self._slot_bytes(incoming))
            if incoming.slot is not None:
                incoming.index = torch.tensor(incoming.block_ids, dtype=torch.long).to(
                    self.memory.device)
        self._loop.notify(sender, Notif("G", tid, "" if incoming.slot is None
                                        else str(incoming.slot)))

    def _slot_bytes(self, incoming: _Incoming) -> int:
        return incoming.num_blocks * self._layer_bytes * self.memory.layout.num_layers

    def _scatter(self, incoming: _Incoming, span: range) -> None:
        """Layers ``span`` have landed in the transfer's slot: into the blocks with them."""
        assert incoming.slot is not None and incoming.index is not None
        layout, n, index = self.memory.layout, incoming.num_blocks, incoming.index
        stream = self._scatter_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for layer in span:
                at = incoming.slot + layer * n * self._layer_bytes
                packed = self._staging.view(at, n * self._layer_bytes)
                self.memory.layers[layer].index_copy_(
                    1, index, packed.view(layout.torch_dtype).view(layout.layer_shape(n)))
            if stream is None:
                incoming.layers.update(span)
                return
            done = torch.cuda.Event()
            done.record(stream)
        incoming.scattering.append((span, done))

    def _free_slot(self, incoming: _Incoming) -> None:
        if incoming.slot is not None:
            self._staging.free(incoming.slot, self._slot_bytes(incoming))
            incoming.slot = None

    def _fail(self, tid: str, status: Status, reason: str, error: KVTransferError) -> None:
        """End ``tid`` unsuccessfully: its waiter fails, a sender let in is told, and the
        blocks stay unfinished until that sender is quiet."""
        incoming = self._active.pop(tid, None)
        early = self._early.pop(tid, None)
        if early is not None:
            self._loop.notify(early[0], Notif("C", tid, f"{int(status)}:{reason}"))
        if tid not in self._over or incoming is not None:
            self._remember(tid, status, reason, incoming is not None)
        if incoming is None:
            return
        incoming.pending.outcome.resolve(error=error)
        for _, done in incoming.scattering:  # our own writes into the blocks end first
            done.synchronize()
        if incoming.sender is None:
            incoming.pending.mark_quiet()  # nobody was ever allowed to write
            return
        if status is not Status.ABORTED:  # the sender aborted: it knows already
            self._loop.notify(incoming.sender, Notif("C", tid, f"{int(status)}:{reason}"))
        self._quiescing[tid] = _Quiescing(incoming.pending, incoming.sender,
                                          time.monotonic() + self.quarantine_s,
                                          incoming.slot, self._slot_bytes(incoming))

    def _quiet(self, q: _Quiescing) -> None:
        """No write of the sender's can land any more: the blocks and the slot are free."""
        if q.slot is not None:
            self._staging.free(q.slot, q.slot_bytes)
            q.slot = None
        q.pending.mark_quiet()

    def _remember(self, tid: str, status: Status, reason: str, was_expected: bool) -> None:
        self._over[tid] = (status, reason, was_expected)
        self._over.move_to_end(tid)
        while len(self._over) > _REMEMBER:
            self._over.popitem(last=False)

    def _on_notif(self, peer: str, notif: Notif) -> None:
        tid = notif.transfer_id
        incoming = self._active.get(tid)
        if notif.kind == "B":
            if incoming is not None and incoming.sender is None:
                if notif.arg != self._fingerprint:
                    reason = (f"layout fingerprint {notif.arg} does not match the receiver's "
                              f"{self._fingerprint}")
                    self._fail(tid, Status.LAYOUT_MISMATCH, reason,
                               error_for_status(Status.LAYOUT_MISMATCH,
                                                f"transfer {tid!r} rejected: {reason}"))
                    self._loop.notify(peer, Notif("C", tid, f"{int(Status.LAYOUT_MISMATCH)}:"
                                                            f"{reason}"))
                else:
                    self._grant(tid, incoming, peer)
            elif tid in self._over or incoming is not None:
                status, reason, _ = self._over.get(tid, (Status.REJECTED, "in use", True))
                self._loop.notify(peer, Notif("C", tid, f"{int(status)}:{reason}"))
            elif not self._closed:
                self._early[tid] = (peer, time.monotonic() + self.config.early_grace_s)
        elif notif.kind == "D" and incoming is not None and incoming.sender == peer:
            span = layer_span(notif.arg) or range(0)
            span = range(span.start, min(span.stop, self.memory.layout.num_layers))
            if incoming.slot is not None:
                self._scatter(incoming, span)
            else:
                incoming.layers.update(span)
            self._complete_if_done(tid, incoming)
        elif notif.kind == "A" and incoming is not None and incoming.sender in (None, peer):
            code_text, _, reason = notif.arg.partition(":")
            code = Status(int(code_text)) if code_text.isdigit() and int(code_text) in \
                Status._value2member_map_ else Status.ABORTED
            message = f"the sender aborted transfer {tid!r}: {reason}"
            self._fail(tid, Status.ABORTED, message, error_for_status(code, message))
        elif notif.kind == "Q":
            q = self._quiescing.get(tid)
            if q is not None and q.sender == peer:
                del self._quiescing[tid]
                self._quiet(q)

    def _on_tick(self) -> bool:
        t = time.monotonic()
        for tid, (sender, deadline) in list(self._early.items()):
            if deadline < t:
                reason = (f"transfer {tid!r}: no receiver expected it within "
                          f"{self.config.early_grace_s:g}s")
                del self._early[tid]
                self._remember(tid, Status.UNKNOWN, reason, False)
                self._loop.notify(sender, Notif("C", tid, f"{int(Status.UNKNOWN)}:{reason}"))
        for tid, q in list(self._quiescing.items()):
            if q.deadline < t:  # the sender went silent: presumed gone, its writes with it
                log.warning("ucx receiver: %s never confirmed transfer %r quiet; freeing its "
                            "blocks after %.1fs", q.sender, tid, self.quarantine_s)
                del self._quiescing[tid]
                self._quiet(q)
        for tid, incoming in list(self._active.items()):
            if incoming.scattering:
                still = []
                for span, done in incoming.scattering:
                    if done.query():
                        incoming.layers.update(span)
                    else:
                        still.append((span, done))
                incoming.scattering = still
                self._complete_if_done(tid, incoming)
        return bool(self._active or self._quiescing or self._early)

    def _complete_if_done(self, tid: str, incoming: _Incoming) -> None:
        if len(incoming.layers) < self.memory.layout.num_layers or incoming.sender is None:
            return
        del self._active[tid]
        self._free_slot(incoming)
        self._remember(tid, Status.OK, "completed", True)
        incoming.pending.outcome.resolve(stats=TransferStats(
            bytes=incoming.num_blocks * self._layer_bytes * len(incoming.layers),
            seconds=now() - incoming.started))
        incoming.pending.mark_quiet()
        self._loop.notify(incoming.sender, Notif("K", tid))
