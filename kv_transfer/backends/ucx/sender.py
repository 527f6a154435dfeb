"""The prefill side of the ``ucx`` backend: one-sided NIXL WRITEs from this pod's blocks
into a decode pod's reserved blocks, layer by layer (protocol.py describes the exchange).

``layer_written`` only queues (engine thread). On the agent's loop thread a layer is posted
once the receiver has let the transfer in and, on CUDA, once the layer's ready event has
fired: one WRITE per run of consecutive layers written since the last look (a whole
prompt at once when the forward is done before the grant comes, one layer at a time while it
runs), whose descriptors are the runs of consecutive blocks on both sides (a fresh pool's
blocks come in long runs: a few descriptors per layer), carrying the ``D`` notification
NIXL delivers after the data. Nothing goes through host memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVMemory
from kv_transfer.backends.ucx.agent import AgentLoop
from kv_transfer.backends.ucx.protocol import Notif, PeerInfo
from kv_transfer.backends.ucx.staging import (
    RUNS_TO_PACK,
    block_addresses,
    make_staging,
    num_runs,
    packed_addresses,
    pieces,
)
from kv_transfer.connector import (
    ConnectorConfig,
    KVSender,
    KVTargetSpec,
    TransferStats,
    check_layout,
    check_target,
    now,
)
from kv_transfer.sending import TrackedSendHandle
from kv_transfer.wire import Status, error_for_status

log = logging.getLogger(__name__)
_GIVE_UP_S = 2.0


@dataclass(slots=True)
class _Layer:
    layer: int
    src: list[int]
    ready: Any | None  # a CUDA event, or None when the write is already complete
    written: float = field(default_factory=now)  # when the forward reported it


@dataclass(slots=True)
class _Write:
    """One WRITE of consecutive layers, and the slot of our staging area it reads from."""

    items: list[_Layer]
    slot: int | None = None
    slot_bytes: int = 0
    xfer: Any = None
    packed: Any = None  # a CUDA event: the gather into the slot is done


@dataclass(slots=True)
class _State:
    """A handle's state on the loop thread."""

    peer: PeerInfo | None = None
    granted: bool = False
    queued: list[_Layer] = field(default_factory=list)
    in_flight: dict[int, _Write] = field(default_factory=dict)  # by its first layer
    remote_slot: int | None = None  # the receiver's staging slot (G), if it gave one
    gathering: list[_Write] = field(default_factory=list)  # packing, not yet posted
    quiet_sent: bool = False
    failed_at: float | None = None  # when the transfer failed with WRITEs in flight
    last_ready: float = 0.0  # when the latest layer was seen written (its event fired)


class UcxSendHandle(TrackedSendHandle):
    def __init__(self, sender: UcxSender, target: KVTargetSpec) -> None:
        super().__init__(target, sender.memory.layout.num_layers)
        self.sender = sender
        self._idle = threading.Event()  # no WRITE of ours is in flight (loop thread sets it)
        self._idle.set()
        self.state = _State()

    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
        def accept() -> bool:
            self._idle.clear()
            return True

        if not self._record(layer, block_ids, accept):
            return
        item = _Layer(layer, list(block_ids), ready)
        self.sender._loop.call(lambda: self.sender._queue(self, item))

    def finished(self) -> bool:
        return self.outcome.done() and self._idle.is_set()

    def cancel(self) -> None:
        self._abort(Status.ABORTED, "the sender aborted the transfer")

    def _give_up(self, reason: str) -> None:
        self._abort(Status.ABORTED, reason)

    def _abort(self, status: Status, reason: str) -> None:
        with self._lock:
            self._closed = True
        error = error_for_status(status, f"KV transfer {self.transfer_id!r} to "
                                         f"{self.target.address}: {reason}")
        if self.outcome.resolve(error=error):
            self.sender._loop.call(lambda: self.sender._aborted(self, status, reason))


class UcxSender(KVSender):
    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        self._peers: dict[str, PeerInfo] = {}  # by agent name (a KVTarget's address)
        self._handles: dict[tuple[str, str], UcxSendHandle] = {}  # loop thread only
        self._closed = False
        self._staging = make_staging(memory, config)
        self._gather_stream = torch.cuda.Stream(memory.device) \
            if memory.device.type == "cuda" else None
        self._loop = AgentLoop(f"pdserve-kv-send-{uuid.uuid4().hex[:12]}", memory,
                               self._on_notif, self._on_tick, self._staging.buffer)
        self._own = PeerInfo.of(memory, self._loop.name, self._loop.metadata,
                                self._staging.address, self._staging.size)
        self._info = self._own.encode()

    def add_peer(self, address: str, info: bytes) -> bytes:
        peer = PeerInfo.decode(info)
        if peer.agent != address:
            raise KVTransferError(f"the peer info of {address!r} names agent {peer.agent!r}")
        self._loop.run(lambda: self._loop.agent.add_remote_agent(peer.metadata))
        self._peers[address] = peer
        return self._info  # the receiver loads it to answer this agent

    def knows_peer(self, address: str) -> bool:
        return address in self._peers

    def begin(self, target: KVTargetSpec) -> UcxSendHandle:
        check_target(target)
        if self._closed:
            raise KVTransferError("the KV sender is closed")
        handle = UcxSendHandle(self, target)
        self._loop.call(lambda: self._start(handle))
        try:
            check_layout(target.layout_fingerprint, self.memory.layout)
        except LayoutMismatchError as exc:
            handle._abort(Status.LAYOUT_MISMATCH, exc.message)  # the receiver learns at once
            raise
        return handle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def unfinished() -> list[UcxSendHandle]:
            return list(self._handles.values())

        try:
            for handle in self._loop.run(unfinished):
                handle._abort(Status.CLOSED, "the KV sender closed")
            self._loop.run(lambda: None)  # the aborts above ran before this
        finally:
            self._loop.stop()

    # -- the loop thread --------------------------------------------------------------

    def _start(self, handle: UcxSendHandle) -> None:
        key = (handle.target.address, handle.transfer_id)
        peer = self._peers.get(handle.target.address)
        if peer is None:
            handle.outcome.resolve(error=KVTransferError(
                f"KV transfer {handle.transfer_id!r}: unknown KV peer "
                f"{handle.target.address!r} (no handshake with it yet)"))
            handle._idle.set()
            return
        old = self._handles.get(key)
        if old is not None and not old.finished():
            handle.outcome.resolve(error=KVTransferError(
                "another transfer with this id is in flight to this receiver"))
            handle._idle.set()
            return
        handle.state.peer = peer
        self._handles[key] = handle
        if not handle.outcome.done():
            self._loop.notify(peer.agent, Notif("B", handle.transfer_id, self._own.fingerprint))

    def _queue(self, handle: UcxSendHandle, item: _Layer) -> None:
        if handle.outcome.done():
            self._settle(handle)
            return
        handle.state.queued.append(item)

    def _aborted(self, handle: UcxSendHandle, status: Status, reason: str) -> None:
        st = handle.state
        st.queued.clear()
        if st.peer is not None:
            self._loop.notify(st.peer.agent, Notif("A", handle.transfer_id,
                                                   f"{int(status)}:{reason}"))
        self._settle(handle)

    def _settle(self, handle: UcxSendHandle) -> None:
        """After a failure: once no WRITE of ours is in flight, say so (Q) and let go.
        WRITEs towards a peer that died may never complete: after ``_GIVE_UP_S`` they are
        released (cancelled) anyway -- they only read this pod's blocks, so reusing those
        blocks can at worst send garbage to a peer that no longer listens."""
        st = handle.state
        st.queued.clear()
        for write in st.gathering:  # packed but never posted: nothing reads the slot
            self._release(write)
        st.gathering.clear()
        if st.in_flight:
            st.failed_at = st.failed_at or time.monotonic()
            if time.monotonic() - st.failed_at < _GIVE_UP_S:
                return
            for layer, write in list(st.in_flight.items()):
                try:
                    self._loop.agent.release_xfer_handle(write.xfer)
                except Exception as exc:  # nixl could not cancel it; nothing else to do
                    log.warning("ucx: giving up on the WRITE of layer %d of %r: %s", layer,
                                handle.transfer_id, exc)
                self._release(write)
            st.in_flight.clear()
        failed = handle.outcome.done() and handle.outcome._error is not None
        if failed and st.granted and not st.quiet_sent and st.peer is not None:
            st.quiet_sent = True
            self._loop.notify(st.peer.agent, Notif("Q", handle.transfer_id))
        handle._idle.set()
        self._handles.pop((handle.target.address, handle.transfer_id), None)

    def _pack(self, handle: UcxSendHandle, items: list[_Layer]) -> _Write:
        """A WRITE of ``items``; scattered blocks are first gathered into a slot of our
        staging area ([layer][K, V][block]) when one is free."""
        write = _Write(items)
        n = len(items[0].src)
        if num_runs(items[0].src) <= RUNS_TO_PACK:
            return write
        nbytes = len(items) * n * self.memory.layout.block_bytes_per_layer
        slot = self._staging.alloc(nbytes)
        if slot is None:
            return write  # block by block, then
        write.slot, write.slot_bytes = slot, nbytes
        index = torch.tensor(items[0].src, dtype=torch.long).to(self.memory.device)
        stream = self._gather_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i, item in enumerate(items):
                if item.ready is not None and stream is not None:
                    stream.wait_event(item.ready)
                packed = self.memory.layers[item.layer].index_select(1, index)
                at = slot + i * (nbytes // len(items))
                self._staging.view(at, nbytes // len(items)).copy_(
                    packed.view(torch.uint8).view(-1))
            if stream is not None:
                write.packed = torch.cuda.Event()
                write.packed.record(stream)
        return write

    def _release(self, write: _Write) -> None:
        if write.slot is not None:
            self._staging.free(write.slot, write.slot_bytes)
            write.slot = None

    def _post(self, handle: UcxSendHandle, write: _Write) -> None:
        """One WRITE for consecutive written layers (same blocks): each NIXL transfer costs a
        set-up and a completion to poll, so a whole prompt written at once goes as one.
        Descriptors pair block i of each side, merged where both sides are consecutive."""
        peer = handle.state.peer
        assert peer is not None
        own, items = self._own, write.items
        n, bb = len(items[0].src), own.block_bytes
        remote_slot = handle.state.remote_slot
        local, remote = [], []
        for i, item in enumerate(items):
            for half in (0, 1):
                src = (packed_addresses(own.staging + write.slot + (2 * i + half) * n * bb, n, bb)
                       if write.slot is not None else
                       block_addresses(own.bases[item.layer], own.num_blocks, bb, half,
                                       item.src))
                dst = (packed_addresses(peer.staging + remote_slot
                                        + (2 * item.layer + half) * n * bb, n, bb)
                       if remote_slot is not None else
                       block_addresses(peer.bases[item.layer], peer.num_blocks, bb, half,
                                       handle.target.block_ids))
                ours, theirs = pieces(src, dst, bb, own.device, peer.device)
                local.append(ours)
                remote.append(theirs)
        first, last = items[0].layer, items[-1].layer
        agent = self._loop.agent
        xfer = agent.initialize_xfer(
            "WRITE", agent.get_xfer_descs(np.concatenate(local), own.mem_type),
            agent.get_xfer_descs(np.concatenate(remote), peer.mem_type), peer.agent,
            Notif("D", handle.transfer_id,
                  str(first) if first == last else f"{first}-{last}").encode())
        state = agent.transfer(xfer)
        if state == "ERR":
            agent.release_xfer_handle(xfer)
            raise KVTransferError(f"NIXL refused to post layers {first}-{last}")
        write.xfer = xfer
        handle.state.in_flight[first] = write

    def _on_notif(self, peer: str, notif: Notif) -> None:
        handle = self._handles.get((peer, notif.transfer_id))
        if handle is None:
            return  # a late notification for a transfer that is over here
        if notif.kind == "G":
            if notif.arg:  # write packed into this slot of the receiver's staging area
                slot = int(notif.arg)
                nbytes = (handle.num_blocks * handle.num_layers
                          * self.memory.layout.block_bytes_per_layer)
                peer_info = handle.state.peer
                if peer_info is None or slot + nbytes > peer_info.staging_bytes:
                    handle._abort(Status.ABORTED, "the receiver granted a staging slot "
                                                  "outside its staging area")
                    return
                handle.state.remote_slot = slot
            handle.state.granted = True
        elif notif.kind == "K":
            t = now()
            handle.outcome.resolve(stats=TransferStats(
                bytes=handle.num_blocks * handle.num_layers
                * self.memory.layout.block_bytes_per_layer, seconds=t - handle._started,
                exposed=t - handle.state.last_ready))
            self._settle(handle)
        elif notif.kind == "C":
            code_text, _, reason = notif.arg.partition(":")
            code = Status(int(code_text)) if code_text.isdigit() and int(code_text) in \
                Status._value2member_map_ else Status.CANCELLED
            handle.outcome.resolve(error=error_for_status(
                code, f"KV transfer {handle.transfer_id!r} to {peer} failed at the receiver: "
                      f"{reason or 'cancelled'}"))
            self._settle(handle)

    def _on_tick(self) -> bool:
        agent = self._loop.agent
        for handle in list(self._handles.values()):
            st = handle.state
            for layer, write in list(st.in_flight.items()):
                state = agent.check_xfer_state(write.xfer)
                if state == "PROC":
                    continue
                del st.in_flight[layer]
                agent.release_xfer_handle(write.xfer)
                self._release(write)
                if state == "ERR":
                    handle._abort(Status.ABORTED, f"the WRITE from layer {layer} failed")
            if handle.outcome.done():
                self._settle(handle)
                continue
            if st.granted:
                written = [item for item in st.queued
                           if item.ready is None or item.ready.query()]
                for item in written:
                    st.queued.remove(item)
                    st.last_ready = max(st.last_ready,
                                        item.written if item.ready is None else now())
                try:
                    st.gathering += [self._pack(handle, group)
                                     for group in _consecutive(written)]
                    for write in [w for w in st.gathering
                                  if w.packed is None or w.packed.query()]:
                        st.gathering.remove(write)
                        self._post(handle, write)
                except Exception as exc:
                    log.exception("ucx: posting layers of %r failed", handle.transfer_id)
                    handle._abort(Status.ABORTED, f"posting layers: {exc}")
        return bool(self._handles)


def _consecutive(items: list[_Layer]) -> list[list[_Layer]]:
    """Written layers in runs of consecutive layers over the same blocks (one WRITE each)."""
    out: list[list[_Layer]] = []
    for item in sorted(items, key=lambda i: i.layer):
        if out and out[-1][-1].layer + 1 == item.layer and out[-1][-1].src == item.src:
            out[-1].append(item)
        else:
            out.append([item])
    return out
