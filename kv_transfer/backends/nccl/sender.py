"""The prefill side of the ``nccl`` backend: per decode pod, a link (rank 0 here) with its
control connection, and one thread that sends what the forward queued, in order, as each
layer's compute finishes: a header (on the control connection) for each batch of
consecutive written layers of one transfer, then one NCCL message per group of up to
``LAYERS_PER_GROUP`` of them (protocol.py). Layers wait for their ready event on the host,
not on the GPU, so the receiver never has receives pending for bytes not yet computed. A
group's blocks are packed into one buffer (packing.py) on a second stream, so the packing
of one group overlaps the send of the one before. One thread per link keeps the
order of operations the same on both ranks whatever the requests' interleaving, and a dead
peer stalls only its own link, which is aborted once a send has been pending past the
timeout.
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

from engine.device import to_device
from engine.errors import KVTransferError, LayoutMismatchError, UnknownPeerError
from engine.kv_layout import KVMemory
from kv_transfer.backends.nccl.control import Control, connect
from kv_transfer.backends.nccl.link import LAYERS_PER_GROUP, SENDER_RANK, Link, PostTimer
from kv_transfer.backends.nccl.packing import empty_packed, pack
from kv_transfer.backends.nccl.protocol import (
    ABORT,
    DATA,
    HEADER_BYTES,
    HELLO,
    ROLE_RECEIVER,
    ROLE_SENDER,
    Header,
    Hello,
    one_run,
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

log = logging.getLogger(__name__)
# Packed (gathered) bytes a link may have on the wire at once; past it, posting waits for
# the oldest sends to finish, so a long prompt cannot double its KV in scratch memory.
_PACKED_BUDGET = 512 << 20


@dataclass(slots=True)
class _Sent:
    """One layer on the wire: its buffers stay alive until ``done`` fires."""

    handle: NcclSendHandle
    done: torch.cuda.Event
    posted: float
    buffers: tuple[torch.Tensor, ...]
    packed_bytes: int
    layers: int  # how many of the handle's layers it carries


@dataclass(slots=True)
class _Job:
    handle: NcclSendHandle
    layer: int  # -1: tell the receiver the transfer was aborted
    block_ids: list[int]
    ready: Any | None


class NcclSendHandle(TrackedSendHandle):
    _WAITED_FOR = "sent"

    def __init__(self, sender: NcclSender, target: KVTargetSpec, link: _SendLink | None
                 ) -> None:
        super().__init__(target, sender.memory.layout.num_layers)
        self.link = link
        self.layer_bytes = sender.memory.layout.block_bytes_per_layer * self.num_blocks
        self._completed = 0  # layers whose send finished
        self._in_flight = 0  # layers queued or on the wire: they read our blocks
        self.last_ready = 0.0  # when the latest layer's compute was seen done

    def layer_written(self, layer: int, block_ids: Sequence[int], ready: Any | None) -> None:
        def accept() -> bool:
            if self.link is None:
                return False
            self._in_flight += 1
            return True

        if self._record(layer, block_ids, accept):
            assert self.link is not None
            self.link.jobs.put(_Job(self, layer, list(block_ids), ready))

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
            self.link.jobs.put(_Job(self, -1, [], None))  # an ABORT header, in order

    def _give_up(self, reason: str) -> None:
        self._fail(reason, tell=True)


@dataclass(slots=True)
class _SendLink:
    link: Link
    control: Control
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
        control = connect(hello.control, hello.key, self.timeout_s)
        link = _SendLink(Link(hello.unique_id, SENDER_RANK, self.memory.device,
                              self.timeout_s), control)
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
        waiting: list[_Job] = []  # queued, in order; they go out once written
        torch.cuda.set_device(link.device)  # this thread's NCCL calls and allocations
        gather = torch.cuda.Stream(link.device)
        try:
            link.wait_ready()
            sl.control.send(Header(HELLO, "hello"))  # the link's NCCL connection, made now
            hello = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=link.device)
            link.send(hello)
            while True:
                busy = bool(sent or waiting)
                try:
                    job = sl.jobs.get(timeout=0.0002 if busy else 0.05)
                except queue.Empty:
                    job = ()
                if job is None:
                    break
                while job:  # take everything queued so far
                    waiting.append(job)
                    try:
                        job = sl.jobs.get_nowait()
                    except queue.Empty:
                        job = ()
                    if job is None:
                        sl.jobs.put(None)
                        job = ()
                written = _written_prefix(waiting)
                if written:
                    del waiting[:len(written)]
                    for batch in _batches(written):
                        self._post(sl, gather, sent, batch)
                sent = self._reap(link, sent)
        except KVTransferError as exc:
            log.warning("nccl sender: a link ended: %s", exc)
        finally:
            link.abort("its sending thread ended")
            sl.control.close()
            for s in sent:
                s.handle._fail(f"the NCCL link failed: {link.error}", tell=False)
                for _ in range(s.layers):
                    s.handle._settled(False)
            while True:  # fail what was still queued
                try:
                    job = sl.jobs.get_nowait()
                except queue.Empty:
                    break
                if job:
                    waiting.append(job)
            for job in waiting:
                if job.layer >= 0:
                    job.handle._fail(f"the NCCL link failed: {link.error}", tell=False)
                    job.handle._settled(False)

    def _post(self, sl: _SendLink, gather: torch.cuda.Stream, sent: list[_Sent],
              batch: list[_Job]) -> None:
        link = sl.link
        handle = batch[0].handle
        if batch[0].layer < 0:  # the transfer was aborted: tell the receiver, in order
            sl.control.send(Header(ABORT, handle.transfer_id))
            return
        if handle.outcome.done():
            for _ in batch:
                handle._settled(False)
            return
        n = len(batch[0].block_ids)
        handle.last_ready = now()  # every layer of the batch is written
        timer = PostTimer()
        sl.control.send(Header(DATA, handle.transfer_id, batch[0].layer, len(batch), n))
        timer.mark("header")
        start = one_run(batch[0].block_ids)  # a batch shares its blocks (_batches)
        idx = None
        if start is None:
            with torch.cuda.stream(gather):  # pinned: a pageable copy waits for the stream
                idx = to_device(torch.tensor(batch[0].block_ids, dtype=torch.long),
                                self.memory.device)
            timer.mark("index")
        for chunk in _chunks(batch):
            while sum(s.packed_bytes for s in sent) > _PACKED_BUDGET:
                sent[:] = self._reap(link, sent)
                time.sleep(0.0002)
            timer.mark("budget")
            # The chunk's layers packed into one buffer on the gather stream (once each
            # layer's compute is done), sent as one message (packing.py says why).
            caches = [self.memory.layers[job.layer] for job in chunk]
            with torch.cuda.stream(gather):
                for job in chunk:
                    if job.ready is not None:
                        gather.wait_event(job.ready)
                packed = empty_packed(caches[0], len(chunk), n)
                pack(caches, idx, start, n, packed)
                gathered = torch.cuda.Event()
                gathered.record(gather)
            link.stream.wait_event(gathered)
            timer.mark("gather")
            link.send(packed.view(torch.uint8).view(-1))
            timer.mark("send")
            done = torch.cuda.Event()
            done.record(link.stream)
            keep = (packed,) if idx is None else (packed, idx)
            sent.append(_Sent(handle, done, time.monotonic(), keep,
                              packed.numel() * packed.element_size(), len(chunk)))
        timer.report(f"posting layers {batch[0].layer}..{batch[-1].layer} of "
                     f"{handle.transfer_id!r} ({n} blocks)")

    def _reap(self, link: Link, sent: list[_Sent]) -> list[_Sent]:
        """Settle sent layers; past the timeout with sends pending and none finishing
        (a receiver gone quiet), end the link."""
        link.look(len(sent))
        still = []
        t = time.monotonic()
        for s in sent:
            if s.done.query():
                for _ in range(s.layers):
                    s.handle._settled(True)
                link.progress_at = t
            else:
                still.append(s)
        if still and t - max(link.progress_at, still[0].posted) > link.timeout_s:
            raise KVTransferError(f"no send finished for {link.timeout_s:g}s (peer gone?)")
        return still

def _batches(jobs: list[_Job]) -> list[list[_Job]]:
    """Runs of jobs of one transfer with consecutive layers (and the same blocks), each
    sent under one header; an abort is a batch of its own."""
    out: list[list[_Job]] = []
    for job in jobs:
        last = out[-1][-1] if out else None
        if last is not None and job.layer >= 0 and last.layer >= 0 \
                and job.handle is last.handle and job.layer == last.layer + 1 \
                and job.block_ids == last.block_ids:
            out[-1].append(job)
        else:
            out.append([job])
    return out


def _chunks(batch: list[_Job]) -> list[list[_Job]]:
    return [batch[i:i + LAYERS_PER_GROUP] for i in range(0, len(batch), LAYERS_PER_GROUP)]


def _written_prefix(waiting: list[_Job]) -> list[_Job]:
    """The queued jobs, in order, up to the first layer whose compute has not finished."""
    out = []
    for job in waiting:
        if job.ready is not None and not job.ready.query():
            break
        out.append(job)
    return out
