"""The sending end of the ``tcp`` backend, and its protocol.

Each receiver and each sender runs its own asyncio loop in a daemon thread (the engine runs
in another thread, the gRPC server in the main one). Payloads are read with
``sock_recv_into`` into a preallocated per-connection buffer (ENVIRONMENT.md: about twice
as fast as ``StreamReader.readexactly``), then scattered (receiver.py). A sender
keeps one persistent connection per receiver address, multiplexes every request's layers
over it, and reconnects after a failure; the receiver acknowledges each transfer once all
its layers are in. Tensors travel through host memory: the sender's packer gathers a layer's
blocks (on CUDA into pinned host memory, on its own stream) and the receiver moves them to
the cache's device on scatter.

On a connection (frames of wire.py): the sender writes DATA (one packed layer) and ABORT
frames of any number of transfers, interleaved; the receiver answers each transfer once,
ACK when every layer is scattered or ERROR (layout mismatch, rejected, cancelled, unknown,
closed). A header the receiver cannot decode ends that connection only; a payload larger
than the receiver can use is read past, not stored.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVMemory
from kv_transfer.aio import LoopThread, parse_address, recv_into, send_buffers, tune
from kv_transfer.backends.tcp.challenge import prove
from kv_transfer.connector import (
    ConnectorConfig,
    KVSender,
    KVTargetSpec,
    check_layout,
    check_target,
)
from kv_transfer.packing import LayerPacker
from kv_transfer.sending import BaseSendHandle, as_bytes
from kv_transfer.wire import (
    HEADER_SIZE,
    FrameHeader,
    FrameKind,
    Status,
    control_frame,
    decode_message,
)

__all__ = ["TcpSendHandle", "TcpSender"]

log = logging.getLogger(__name__)

_MAX_IOV = 512  # buffers per sendmsg (Linux allows 1024)
_MAX_BATCH_BYTES = 64 << 20


@dataclass(slots=True, eq=False)
class _Item:
    handle: TcpSendHandle
    header: bytes  # for control frames: the whole frame
    payload: torch.Tensor | None  # flat uint8 on the CPU; None for control frames


class _Link:
    """One receiver address on the sender's loop thread: a persistent connection, the send
    queue every request to that address shares, and the handles awaiting its replies."""

    def __init__(self, address: str, connect_timeout: float, token: str | None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.token = token  # answers the receiver's challenge (challenge.py) when set
        self.queue: deque[_Item] = deque()
        self.wake = asyncio.Event()
        self.handles: dict[str, TcpSendHandle] = {}
        self.gen = 0  # which connection: a failure fails only the transfers that used it
        self.task = asyncio.get_running_loop().create_task(self._run())

    def push(self, item: _Item) -> None:
        self.queue.append(item)
        self.wake.set()

    def register(self, handle: TcpSendHandle) -> None:
        old = self.handles.get(handle.transfer_id)
        if old is not None and not old.done():
            handle._lost("another transfer with this id is in flight to this receiver")
            return
        self.handles[handle.transfer_id] = handle

    def fail(self, pred: Callable[[TcpSendHandle], bool], reason: str) -> None:
        for tid, handle in list(self.handles.items()):
            if pred(handle):
                del self.handles[tid]
                handle._lost(reason)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_work()
            try:
                sock = await self._connect(loop)
            except (TimeoutError, OSError) as exc:
                self.fail(lambda h: True, f"cannot connect: {exc!r}")
                self.queue.clear()
                continue
            self.gen += 1
            gen = self.gen
            tasks = {loop.create_task(self._read(loop, sock)),
                     loop.create_task(self._write(loop, sock, gen))}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                errors = [t.exception() for t in done if not t.cancelled() and t.exception()]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                sock.close()
            why = repr(errors[0]) if errors else "closed by the receiver"
            def on_this_connection(h: TcpSendHandle, gen: int = gen) -> bool:
                return h._gen == gen

            self.fail(on_this_connection, f"connection lost ({why})")

    async def _wait_for_work(self) -> None:
        """Until an item that deserves a connection is at the head of the queue."""
        while True:
            while self.queue:
                item = self.queue[0]
                if item.payload is None or not item.handle.done():
                    return
                self.queue.popleft()  # data of a transfer that already failed
            self.wake.clear()
            await self.wake.wait()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        host, port = parse_address(self.address)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        tune(sock)
        if self.token is not None:
            try:
                await prove(loop, sock, self.token, self.connect_timeout)
            except BaseException:
                sock.close()
                raise
        return sock

    async def _write(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     gen: int) -> None:
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            # Everything queued goes out in as few sendmsg calls as possible: each syscall
            # hands the GIL back and forth with the engine thread, and that hand-off, not the
            # copy, bounded many small layers (16 interleaved requests).
            buffers: list[memoryview | bytes] = []
            size = 0
            while self.queue and len(buffers) < _MAX_IOV - 1 and size < _MAX_BATCH_BYTES:
                item = self.queue.popleft()
                if item.payload is not None:
                    if item.handle.done():
                        continue
                    item.handle._gen = gen
                    buffers += [item.header, memoryview(item.payload.numpy().data)]
                    size += len(item.header) + item.payload.numel()
                else:
                    buffers.append(item.header)
                    size += len(item.header)
            await send_buffers(loop, sock, buffers)

    async def _read(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        header = bytearray(HEADER_SIZE)
        while await recv_into(loop, sock, memoryview(header), eof_ok=True):
            frame = FrameHeader.decode(header)
            if frame.kind not in (FrameKind.ACK, FrameKind.ERROR):
                raise KVTransferError(f"the receiver sent a {frame.kind.name} frame")
            body = bytearray(frame.payload_bytes)
            await recv_into(loop, sock, memoryview(body))
            handle = self.handles.pop(frame.transfer_id, None)
            if handle is None:
                continue  # a late reply for a transfer already over here
            if frame.kind == FrameKind.ACK:
                handle._acked()
            else:
                handle._rejected(frame.status, decode_message(body))


class TcpSendHandle(BaseSendHandle):
    def __init__(self, sender: TcpSender, target: KVTargetSpec) -> None:
        super().__init__(target, sender.memory.layout, sender._packer)
        self._sender = sender
        self._gen: int | None = None  # the connection its frames went on (loop thread)

    def _transmit(self, header: FrameHeader, packed: torch.Tensor) -> None:
        host = packed if packed.device.type == "cpu" else packed.to("cpu")  # packer did it
        item = _Item(self, header.encode(), as_bytes(host))
        if not self._sender._io.call(self._sender._push, self.target.address, item):
            self._lost("the KV sender is closed")

    def _notify_abort(self, status: Status, reason: str) -> None:
        # Sent even if it needs a new connection: the receiver has usually registered the
        # transfer already (decode calls expect() first) and should not wait for a timeout.
        frame = control_frame(FrameKind.ABORT, self.transfer_id, status, reason)
        self._sender._io.call(self._sender._push_abort, _Item(self, frame, None))


class TcpSender(KVSender):
    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        self._connect_timeout = config.connect_timeout_s
        self._token = config.token
        self._links: dict[str, _Link] = {}  # loop thread only
        self._closed = False
        self._packer = LayerPacker(memory, "kv-pack", to_host=True)
        self._io = LoopThread("kv-send")

    def begin(self, target: KVTargetSpec) -> TcpSendHandle:
        check_target(target)
        parse_address(target.address)
        if self._closed:
            raise KVTransferError("the KV sender is closed")
        handle = TcpSendHandle(self, target)
        self._io.call(self._register, handle)
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
        try:
            for handle in self._io.run(self._unfinished(), timeout=5.0):
                handle._abort(Status.CLOSED, "the KV sender closed")
            self._io.run(self._shutdown(), timeout=5.0)
        except Exception:
            log.exception("KV sender: unclean shutdown")
        self._io.stop()
        self._packer.close()

    def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(address, self._connect_timeout, self._token)
        return link

    def _register(self, handle: TcpSendHandle) -> None:
        self._link(handle.target.address).register(handle)

    def _push(self, address: str, item: _Item) -> None:
        self._link(address).push(item)

    def _push_abort(self, item: _Item) -> None:
        link = self._link(item.handle.target.address)
        if link.handles.get(item.handle.transfer_id) is item.handle:
            del link.handles[item.handle.transfer_id]
        link.push(item)

    async def _unfinished(self) -> list[TcpSendHandle]:
        return [h for link in self._links.values() for h in link.handles.values()]

    async def _shutdown(self) -> None:
        links = list(self._links.values())
        deadline = asyncio.get_running_loop().time() + 0.5
        # Give the aborts queued by close() a moment to reach their receivers.
        while any(link.queue for link in links) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for link in links:
            link.task.cancel()
        await asyncio.gather(*(link.task for link in links), return_exceptions=True)
        for link in links:
            link.fail(lambda h: True, "the KV sender closed")
