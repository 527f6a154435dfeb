"""The prefill side of the ``nccl`` backend: per decode pod, a link (rank 0 here) and one
thread that sends, in the order layers become ready, each layer's header and then its
blocks gathered into one contiguous buffer on the link's stream (which first waits on the
layer's ready event). One thread per link keeps the order of operations the same on both
ranks whatever the requests' interleaving, and a dead peer stalls only its own link, which
is aborted once a send has been pending past the timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import KVTransferError, LayoutMismatchError, UnknownPeerError
from engine.kv_layout import KVMemory
from kv_transfer.backends.nccl.link import SENDER_RANK, Link
from kv_transfer.backends.nccl.protocol import (
    ABORT,
    DATA,
    ROLE_RECEIVER,
    ROLE_SENDER,
    Header,
    Hello,
)
from kv_transfer.connector import (
    ConnectorConfig,
    KVSender,
    KVTargetSpec,
    Outcome,
    SendHandle,
    TransferStats,
    check_layout,
    check_target,
    now,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sent:
    """One layer on the wire: its buffers stay alive until ``done`` fires."""

    handle: NcclSendHandle
    done: torch.cuda.Event
    posted: float
    buffers: tuple[torch.Tensor, ...]
    ready: Any | None  # the layer's compute event (None: done when posted)


class NcclSendHandle(SendHandle):
    def __init__(self, sender: NcclSender, target: KVTargetSpec, link: _SendLink | None
                 ) -> None:
        self.target = target
        self.link = link
        self.num_layers = sender.memory.layout.num_layers
        self.num_blocks = len(target.block_ids)
        self.layer_bytes = sender.memory.layout.block_bytes_per_layer * self.num_blocks
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._written = bytearray(self.num_layers)
        self._num_written = 0
        self._completed = 0  # layers whose send finished
        self._in_flight = 0  # layers queued or on the wire: they read our blocks
        self._closed = False
        self._started = now()
        self.last_ready = 0.0  # when the latest layer's compute was seen done

    @property
    def transfer_id(self) -> str:
        return self.target.transfer_id

    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
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
            if self.outcome.done() or self.link is None:
                return
            self._in_flight += 1
        self.link.jobs.put((self, layer, list(block_ids), ready))

    def finished(self) -> bool:
        with self._lock:
            return self.outcome.done() and self._in_flight == 0

    def cancel(self) -> None:
        self._fail("the sender aborted the transfer", tell=True)

    def _settled(self, layer_ok: bool) -> None:
        """A layer left the wire (sent, or dropped)."""
        with self._lock:
            self._in_flight -= 1
            self._completed += int(layer_ok)
            complete = self._completed == self.num_layers
        if complete:
            t = now()
            self.outcome.resolve(stats=TransferStats(self.layer_bytes * self.num_layers,
                                                     t - self._started, t - self.last_ready))

    def _fail(self, reason: str, tell: bool) -> None:
        with self._lock:
            self._closed = True
        error = KVTransferError(f"KV transfer {self.transfer_id!r} to {self.target.address}: "
                                f"{reason}")
        if self.outcome.resolve(error=error) and tell and self.link is not None:
            self.link.jobs.put((self, -1, [], None))  # an ABORT header, in order

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            written = self._num_written
        if written != self.num_layers:
            self._fail(f"the forward wrote {written} of {self.num_layers} layers", tell=True)

    def wait(self, timeout: float) -> TransferStats:
        self._close()
        if not self.outcome.wait_done(timeout):
            self._fail(f"not sent within {timeout:g}s", tell=True)
        return self.outcome.result()

    async def wait_async(self, timeout: float) -> TransferStats:
        self._close()
        if not await self.outcome.wait_done_async(timeout):
            self._fail(f"not sent within {timeout:g}s", tell=True)
        return self.outcome.result()


@dataclass(slots=True)
class _SendLink:
    link: Link
    jobs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None


class NcclSender(KVSender):
    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        if memory.device.type != "cuda":
            raise KVTransferError("the nccl connector needs KV memory on a GPU")
        self.timeout_s = max(config.connect_timeout_s, 5.0)
        self._links: dict[str, _SendLink] = {}
        self._lock = threading.Lock()
        self._closed = False

    def add_peer(self, address: str, info: bytes) -> bytes:
        hello = Hello.decode(info, ROLE_RECEIVER)
        if hello.address != address:
            raise KVTransferError(f"the handshake of {address!r} names {hello.address!r}")
        check_layout(hello.fingerprint, self.memory.layout)
        link = _SendLink(Link(hello.unique_id, SENDER_RANK, self.memory.device,
                              self.timeout_s))
        link.thread = threading.Thread(target=self._serve, args=(link,), daemon=True,
                                       name="nccl-send")
        with self._lock:
            old = self._links.get(address)
            self._links[address] = link
        if old is not None:  # the receiver restarted or re-introduced itself
            old.link.abort("replaced by a new handshake")
            old.jobs.put(None)
        link.thread.start()
        return Hello(ROLE_SENDER, hello.unique_id, self.memory.fingerprint, address).encode()

    def knows_peer(self, address: str) -> bool:
        link = self._links.get(address)
        return link is not None and not link.link.aborted

    def begin(self, target: KVTargetSpec) -> NcclSendHandle:
        check_target(target)
        if self._closed:
            raise KVTransferError("the KV sender is closed")
        link = self._links.get(target.address)
        handle = NcclSendHandle(self, target, link if link and not link.link.aborted
                                else None)
        if handle.link is None:
            handle.outcome.resolve(error=UnknownPeerError(
                f"unknown KV peer {target.address!r} (no live NCCL link to it)"))
            return handle
        try:
            check_layout(target.layout_fingerprint, self.memory.layout)
        except LayoutMismatchError:
            handle._fail("layout mismatch", tell=True)
            raise
        return handle

    def close(self) -> None:
        self._closed = True
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.link.abort("the KV sender closed")
            link.jobs.put(None)
            if link.thread is not None:
                link.thread.join(timeout=5)

    # -- a link's thread ---------------------------------------------------------------

    def _serve(self, sl: _SendLink) -> None:
        link = sl.link
        sent: list[_Sent] = []
        torch.cuda.set_device(link.device)  # this thread's NCCL calls and allocations
        try:
            link.wait_ready()
            while True:
                try:
                    job = sl.jobs.get(timeout=0.0005 if sent else 0.05)
                except queue.Empty:
                    job = ()
                if job is None:
                    break
                if job:
                    self._post(link, sent, *job)
                sent = self._reap(link, sent)
        except KVTransferError as exc:
            log.warning("nccl sender: a link ended: %s", exc)
        finally:
            link.abort("its sending thread ended")
            for s in sent:
                s.handle._fail(f"the NCCL link failed: {link.error}", tell=False)
                s.handle._settled(False)
            while True:  # fail what was still queued
                try:
                    job = sl.jobs.get_nowait()
                except queue.Empty:
                    break
                if job and job[1] >= 0:
                    job[0]._fail(f"the NCCL link failed: {link.error}", tell=False)
                    job[0]._settled(False)

    def _post(self, link: Link, sent: list[_Sent], handle: NcclSendHandle, layer: int,
              block_ids: list[int], ready: Any | None) -> None:
        device = self.memory.device
        if layer < 0:  # the transfer was aborted: tell the receiver, in order
            head = Header(ABORT, handle.transfer_id)
            buf = torch.frombuffer(bytearray(head.encode()), dtype=torch.uint8).to(device)
            link.send(buf)
            return
        if handle.outcome.done():
            handle._settled(False)
            return
        with torch.cuda.stream(link.stream):
            if ready is not None:
                link.stream.wait_event(ready)
            idx = torch.tensor(block_ids, dtype=torch.long).to(device, non_blocking=True)
            packed = self.memory.layers[layer].index_select(1, idx)
            raw = Header(DATA, handle.transfer_id, layer, len(block_ids)).encode()
            header = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(
                device, non_blocking=True)
        link.send(header)
        link.send(packed.view(torch.uint8).view(-1))
        done = torch.cuda.Event()
        done.record(link.stream)
        sent.append(_Sent(handle, done, time.monotonic(), (idx, packed, header), ready))
        if ready is None:
            handle.last_ready = now()

    def _reap(self, link: Link, sent: list[_Sent]) -> list[_Sent]:
        still = []
        for s in sent:
            if s.ready is not None and s.ready.query():
                s.handle.last_ready = max(s.handle.last_ready, now())
                s.ready = None
            if s.done.query():
                s.handle._settled(True)
            elif time.monotonic() - s.posted > link.timeout_s:
                raise KVTransferError(f"a send pending for {link.timeout_s:g}s (peer gone?)")
            else:
                still.append(s)
        return still
