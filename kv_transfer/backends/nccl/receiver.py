"""The decode side of the ``nccl`` backend: receiver-posted receives into reserved blocks.

Each prefill pod that introduces itself gets a link (rank 1 here) and a thread serving it:
read a layer header, receive the layer into a staging buffer on the link's stream, scatter
it into the transfer's reserved blocks -- or into nothing, for a transfer that is over --
and count it. The decision and the scatter happen under the receiver's lock and the scatter
is waited for, so once ``cancel`` returns nothing more lands in the blocks.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVMemory
from kv_transfer.backends.nccl.link import RECEIVER_RANK, Link, new_unique_id
from kv_transfer.backends.nccl.protocol import (
    ABORT,
    HEADER_BYTES,
    ROLE_RECEIVER,
    ROLE_SENDER,
    Header,
    Hello,
)
from kv_transfer.connector import ConnectorConfig, KVReceiver, PendingTransfer, TransferStats, now

log = logging.getLogger(__name__)
_REMEMBER = 65536
_OFFER_TTL_S = 60.0


@dataclass(slots=True)
class _Incoming:
    pending: PendingTransfer
    index: torch.Tensor  # the reserved block ids, on the cache's device
    started: float
    link: Link | None = None
    layers: set[int] = field(default_factory=set)


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
        self._offers: dict[bytes, float] = {}  # unique ids offered, awaiting a sender
        self._links: list[tuple[Link, threading.Thread]] = []
        self._closed = False

    def peer_info(self) -> bytes:
        uid = new_unique_id()
        with self._lock:
            t = time.monotonic()
            self._offers = {u: at for u, at in self._offers.items() if t - at < _OFFER_TTL_S}
            self._offers[uid] = t
        return Hello(ROLE_RECEIVER, uid, self.memory.fingerprint, self.address).encode()

    def add_peer(self, info: bytes) -> None:
        hello = Hello.decode(info, ROLE_SENDER)
        with self._lock:
            if self._offers.pop(hello.unique_id, None) is None:
                raise KVTransferError("an nccl sender answered a handshake nobody offered")
        if hello.fingerprint != self.memory.fingerprint:
            raise LayoutMismatchError(f"the nccl sender's layout {hello.fingerprint} is not "
                                      f"this pod's {self.memory.fingerprint}")
        link = Link(hello.unique_id, RECEIVER_RANK, self.memory.device, self.timeout_s)
        thread = threading.Thread(target=self._serve, args=(link,), daemon=True,
                                  name="nccl-recv")
        with self._lock:
            self._links.append((link, thread))
        thread.start()

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        ids = self.memory.check_block_ids(block_ids)
        pending = PendingTransfer(transfer_id, on_cancel=self.cancel)
        index = torch.tensor(ids, dtype=torch.long, device=self.memory.device)
        with self._lock:
            if self._closed:
                raise KVTransferError("the KV receiver is closed")
            if transfer_id in self._active or transfer_id in self._over:
                raise ValueError(f"transfer id {transfer_id!r} is in use or was used")
            self._active[transfer_id] = _Incoming(pending, index, now())
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

    def _end(self, tid: str, reason: str, error: KVTransferError | None = None) -> None:
        """Fail ``tid``; taking the lock waits out a scatter in progress for it."""
        with self._lock:
            incoming = self._active.pop(tid, None)
            self._remember(tid, reason)
        if incoming is not None:
            incoming.pending.outcome.resolve(error=error or KVTransferError(reason))

    def _remember(self, tid: str, reason: str) -> None:
        self._over[tid] = reason
        while len(self._over) > _REMEMBER:
            self._over.popitem(last=False)

    # -- a link's thread ---------------------------------------------------------------

    def _serve(self, link: Link) -> None:
        device = self.memory.device
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
        host = torch.empty(HEADER_BYTES, dtype=torch.uint8, pin_memory=True)
        staging = torch.empty(0, dtype=torch.uint8, device=device)
        torch.cuda.set_device(link.device)  # this thread's NCCL calls and allocations
        try:
            link.wait_ready()
            while not link.aborted:
                link.recv(header)
                with torch.cuda.stream(link.stream):
                    host.copy_(header, non_blocking=True)
                self._wait_for_header(link)
                head = Header.decode(bytes(host.numpy()))
                if head.kind == ABORT:
                    self._end(head.transfer_id, f"the sender aborted transfer "
                                                f"{head.transfer_id!r}")
                    continue
                nbytes = head.num_blocks * self._layer_bytes
                if staging.numel() < nbytes:
                    staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
                link.recv(staging[:nbytes])
                self._land(link, head, staging[:nbytes])
        except KVTransferError as exc:
            log.warning("nccl receiver %s: a link ended: %s", self.address, exc)
        finally:
            link.abort("its receiving thread ended")
            with self._lock:
                lost = [t for t, i in self._active.items() if i.link is link]
            for tid in lost:
                self._end(tid, f"transfer {tid!r}: the NCCL link to its sender failed")

    def _wait_for_header(self, link: Link) -> None:
        """Idle links wait as long as they live; only close (abort) ends this wait."""
        done = torch.cuda.Event()
        done.record(link.stream)
        pause = 0.0001
        while not done.query():
            if link.aborted:
                raise KVTransferError(f"link aborted: {link.error}")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)  # quick while busy, cheap once idle

    def _land(self, link: Link, head: Header, data: torch.Tensor) -> None:
        layout = self._layout
        with self._lock:
            incoming = self._active.get(head.transfer_id)
            if incoming is not None:
                incoming.link = link
                n = incoming.index.numel()
                if head.num_blocks != n or not 0 <= head.layer < layout.num_layers \
                        or head.layer in incoming.layers:
                    incoming = None
                    problem = (f"layer {head.layer} of {head.num_blocks} blocks, expected "
                               f"{n} blocks and a new layer")
                else:
                    problem = ""
                    packed = data.view(layout.torch_dtype).view(layout.layer_shape(n))
                    with torch.cuda.stream(link.stream):
                        self.memory.layers[head.layer].index_copy_(1, incoming.index, packed)
            else:
                problem = ""
            link.synchronize("receiving a layer")  # received, and scattered if wanted
            if incoming is not None:
                incoming.layers.add(head.layer)
                done = len(incoming.layers) == layout.num_layers
                if done:
                    del self._active[head.transfer_id]
                    self._remember(head.transfer_id, "completed")
        if problem:
            self._end(head.transfer_id, f"transfer {head.transfer_id!r} rejected: {problem}")
        elif incoming is not None and done:
            incoming.pending.outcome.resolve(stats=TransferStats(
                bytes=incoming.index.numel() * self._layer_bytes * layout.num_layers,
                seconds=now() - incoming.started))
