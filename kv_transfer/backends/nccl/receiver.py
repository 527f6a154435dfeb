"""The decode side of the ``nccl`` backend: receiver-posted receives into reserved blocks.

Each prefill pod that introduces itself gets a link (rank 1 here), whose control connection
it opens to this end's listener, and a thread serving it: read a batch header from the
control connection, post the receives it announces -- one per group of layers, into a
packed buffer unpacked into the reserved blocks on a second stream (packing.py; so one
group's unpacking overlaps the next one's receive), or dropped for a transfer that is over
-- and count each layer in once its event fires. Nothing waits on the
host between layers. A cancelled transfer fails at once, but its blocks are released
(``PendingTransfer.mark_quiet``) only once the layers already posted for it have landed
or the link has been aborted: until then NCCL may still write into them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVMemory
from kv_transfer.backends.nccl.control import SECRET_BYTES, Control, ControlListener
from kv_transfer.backends.nccl.link import (
    LAYERS_PER_GROUP,
    RECEIVER_RANK,
    Link,
    PostTimer,
    new_unique_id,
)
from kv_transfer.backends.nccl.packing import empty_packed, unpack
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
from kv_transfer.connector import ConnectorConfig, KVReceiver, PendingTransfer, TransferStats, now

log = logging.getLogger(__name__)
_REMEMBER = 65536
_OFFER_TTL_S = 60.0
_PACKED_BUDGET = 512 << 20  # packed bytes awaiting their scatter, per link


@dataclass(slots=True)
class _Incoming:
    pending: PendingTransfer
    index: torch.Tensor  # the reserved block ids, on the cache's device
    run_start: int | None  # the first block when they are one run (received in place)
    started: float
    link: Link | None = None
    posted: set[int] = field(default_factory=set)
    landed: set[int] = field(default_factory=set)
    last: torch.cuda.Event | None = None  # fires once every posted layer is in


@dataclass(slots=True)
class _Landing:
    """A posted layer: counted in once ``done`` fires; its buffers live until then."""

    tid: str
    layer: int
    done: torch.cuda.Event
    posted: float
    buffers: tuple[torch.Tensor, ...]
    packed_bytes: int
    incoming: _Incoming | None  # None: received into scratch and dropped


class NcclReceiver(KVReceiver):
    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        if memory.device.type != "cuda":
            raise KVTransferError("the nccl connector needs KV memory on a GPU")
        self.address = f"nccl-{uuid.uuid4().hex[:16]}"
        self.timeout_s = max(config.connect_timeout_s, 5.0)
        self._layout = memory.layout
        self._layer_bytes = memory.layout.block_bytes_per_layer
        self._lock = threading.Lock()
        self._active: dict[str, _Incoming] = {}
        self._over: OrderedDict[str, str] = OrderedDict()
        self._offers: dict[bytes, tuple[float, bytes]] = {}  # uid -> (when, secret)
        self._listener = ControlListener(config.host, config.port, config.advertise_host,
                                         self.timeout_s)
        self._links: list[tuple[Link, threading.Thread]] = []
        self._draining: dict[Link, list[_Incoming]] = {}  # ended with layers posted
        self._closed = False

    def peer_info(self) -> bytes:
        uid, secret = new_unique_id(), os.urandom(SECRET_BYTES)
        with self._lock:
            t = time.monotonic()
            self._offers = {u: o for u, o in self._offers.items() if t - o[0] < _OFFER_TTL_S}
            self._offers[uid] = (t, secret)
        hello = Hello(ROLE_RECEIVER, uid, self.memory.fingerprint, self.address,
                      self._listener.address, secret)
        self._listener.expect(hello.key)
        return hello.encode()

    def add_peer(self, info: bytes) -> None:
        hello = Hello.decode(info, ROLE_SENDER)
        with self._lock:
            offer = self._offers.pop(hello.unique_id, None)
        if offer is None:
            raise KVTransferError("an nccl sender answered a handshake nobody offered")
        if hello.fingerprint != self.memory.fingerprint:
            raise LayoutMismatchError(f"the nccl sender's layout {hello.fingerprint} is not "
                                      f"this pod's {self.memory.fingerprint}")
        link = Link(hello.unique_id, RECEIVER_RANK, self.memory.device, self.timeout_s)
        thread = threading.Thread(target=self._serve, args=(link, hello.unique_id + offer[1]),
                                  daemon=True, name="nccl-recv")
        with self._lock:
            self._links.append((link, thread))
        thread.start()

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        ids = self.memory.check_block_ids(block_ids)
        pending = PendingTransfer(transfer_id, on_cancel=self.cancel, drains=True)
        index = torch.tensor(ids, dtype=torch.long, device=self.memory.device)
        with self._lock:
            if self._closed:
                raise KVTransferError("the KV receiver is closed")
            if transfer_id in self._active or transfer_id in self._over:
                raise ValueError(f"transfer id {transfer_id!r} is in use or was used")
            self._active[transfer_id] = _Incoming(pending, index, one_run(ids), now())
        return pending

    def cancel(self, transfer_id: str) -> None:
        self._end(transfer_id, f"transfer {transfer_id!r} was cancelled by the receiver")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            tids = list(self._active)
            links = list(self._links)
        for tid in tids:
            self._end(tid, f"transfer {tid!r}: the KV receiver closed")
        for link, thread in links:
            link.abort("the KV receiver closed")
            thread.join(timeout=5)
        self._listener.close()

    def _end(self, tid: str, reason: str, error: KVTransferError | None = None) -> None:
        """Fail ``tid`` now; its blocks are released (``mark_quiet``) once none of its
        posted layers can still land in them -- by the link's thread, which posts them."""
        with self._lock:
            incoming = self._active.pop(tid, None)
            self._remember(tid, reason)
            if incoming is not None and incoming.link is not None:
                self._draining.setdefault(incoming.link, []).append(incoming)
        if incoming is None:
            return
        incoming.pending.outcome.resolve(error=error or KVTransferError(reason))
        if incoming.link is None:  # no header came for it: nothing was posted
            incoming.pending.mark_quiet()

    def _remember(self, tid: str, reason: str) -> None:
        self._over[tid] = reason
        while len(self._over) > _REMEMBER:
            self._over.popitem(last=False)

    # -- a link's thread ---------------------------------------------------------------

    def _serve(self, link: Link, key: bytes) -> None:
        torch.cuda.set_device(link.device)  # this thread's NCCL calls and allocations
        scatter = torch.cuda.Stream(link.device)
        landing: list[_Landing] = []
        control: Control | None = None
        try:
            link.wait_ready()
            control = self._listener.take(key, self.timeout_s)
            while not link.aborted:
                landing = self._reap(link, landing)
                # While layers land, look without waiting (a socket timeout is rounded up
                # to whole milliseconds of poll()); idle, block on the socket.
                head = control.read(0.0 if landing else 0.05)
                if head is None:
                    if landing:
                        time.sleep(0.00005)
                    continue
                if head.kind == ABORT:
                    self._end(head.transfer_id, f"the sender aborted transfer "
                                                f"{head.transfer_id!r}")
                elif head.kind == HELLO:  # the link's first NCCL message: it connects now
                    hello = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=link.device)
                    link.recv(hello)
                    landing.append(_landing_of(link, hello))
                elif head.kind == DATA:
                    self._post_layers(link, scatter, head, landing)
        except KVTransferError as exc:
            log.warning("nccl receiver %s: a link ended: %s", self.address, exc)
        finally:
            link.abort("its receiving thread ended")  # nothing lands after this
            if control is not None:
                control.close()
            with self._lock:
                lost = [t for t, i in self._active.items() if i.link is link]
            for tid in lost:
                self._end(tid, f"transfer {tid!r}: the NCCL link to its sender failed")
            with self._lock:
                drained = self._draining.pop(link, [])
            for incoming in drained:
                incoming.pending.mark_quiet()

    def _post_layers(self, link: Link, scatter: torch.cuda.Stream, head: Header,
                     landing: list[_Landing]) -> None:
        layout = self._layout
        n = head.num_blocks
        if not 0 < n <= self.memory.num_blocks or head.num_layers < 1 \
                or head.layer + head.num_layers > layout.num_layers:
            raise KVTransferError(f"a header for {head.num_layers} layers from "
                                  f"{head.layer} of {n} blocks cannot be met")
        with self._lock:
            incoming = self._active.get(head.transfer_id)
            problem = ""
            if incoming is not None:
                incoming.link = link
                wanted = range(head.layer, head.layer + head.num_layers)
                if n != incoming.index.numel() or incoming.posted.intersection(wanted):
                    problem = (f"layers {head.layer}..{wanted[-1]} of {n} blocks, expected "
                               f"{incoming.index.numel()} blocks and new layers")
                    incoming = None
                else:
                    incoming.posted.update(wanted)
        layers = list(range(head.layer, head.layer + head.num_layers))
        timer = PostTimer()
        for first in range(0, len(layers), LAYERS_PER_GROUP):
            chunk = layers[first:first + LAYERS_PER_GROUP]
            while sum(x.packed_bytes for x in landing) > _PACKED_BUDGET:
                landing[:] = self._reap(link, landing)
                time.sleep(0.0002)
            timer.mark("budget")
            # One message per chunk (packing.py): into one buffer, unpacked into the
            # reserved blocks on the scatter stream -- or dropped, for a transfer that is
            # over (still received: the sender's message is on its way).
            caches = [self.memory.layers[layer] for layer in chunk]
            with torch.cuda.stream(link.stream):
                packed = empty_packed(caches[0], len(chunk), n)
            timer.mark("allocate")
            link.recv(packed.view(torch.uint8).view(-1))
            timer.mark("recv")
            done = torch.cuda.Event()
            done.record(link.stream)
            buffers: tuple[torch.Tensor, ...] = (packed,)
            if incoming is not None:
                landed = torch.cuda.Event()
                with torch.cuda.stream(scatter):
                    scatter.wait_event(done)
                    unpack(packed, caches, incoming.index, incoming.run_start)
                    landed.record(scatter)
                done = landed
                buffers = (packed, incoming.index)
                incoming.last = done  # the last posted lands last (the scatter stream
                # waits on the receive stream, which runs the chunks in order)
            # one landing per layer (a transfer counts its layers in), the chunk's bytes
            # on its first
            for i, layer in enumerate(chunk):
                landing.append(_Landing(head.transfer_id, layer, done, time.monotonic(),
                                        buffers,
                                        packed.numel() * packed.element_size() if i == 0
                                        else 0, incoming))
            timer.mark("scatter")
        timer.report(f"posting layers {head.layer}..{layers[-1]} of {head.transfer_id!r} "
                     f"({n} blocks)")
        if problem:
            self._end(head.transfer_id, f"transfer {head.transfer_id!r} rejected: {problem}")

    def _reap(self, link: Link, landing: list[_Landing]) -> list[_Landing]:
        """Count landed layers in; past the timeout with layers posted and none landing
        (a sender gone quiet mid-transfer), end the link."""
        link.look(len(landing))
        still: list[_Landing] = []
        finished: list[_Incoming] = []
        t = time.monotonic()
        for x in landing:
            if not x.done.query():
                still.append(x)
                continue
            link.progress_at = t
            if x.incoming is None:
                continue
            with self._lock:
                if self._active.get(x.tid) is not x.incoming:
                    continue  # ended meanwhile
                x.incoming.landed.add(x.layer)
                if len(x.incoming.landed) == self._layout.num_layers:
                    del self._active[x.tid]
                    self._remember(x.tid, "completed")
                    finished.append(x.incoming)
        if still and t - max(link.progress_at, still[0].posted) > link.timeout_s:
            raise KVTransferError(f"no layer landed for {link.timeout_s:g}s (sender gone?)")
        with self._lock:
            drains = self._draining.get(link, [])
            quiet = [i for i in drains if i.last is None or i.last.query()]
            if quiet:
                self._draining[link] = [i for i in drains if i not in quiet]
        for incoming in finished:
            incoming.pending.outcome.resolve(stats=TransferStats(
                bytes=incoming.index.numel() * self._layer_bytes * self._layout.num_layers,
                seconds=now() - incoming.started))
        for incoming in quiet:
            incoming.pending.mark_quiet()
        return still


def _landing_of(link: Link, scratch: torch.Tensor) -> _Landing:
    """A message received into scratch, tracked only so the link notices if it never
    comes."""
    done = torch.cuda.Event()
    done.record(link.stream)
    return _Landing("", -1, done, time.monotonic(), (scratch,), 0, None)
