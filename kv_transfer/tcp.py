"""The ``tcp`` backend: KV frames over plain asyncio sockets, always available.

Each receiver and each sender runs its own asyncio loop in a daemon thread (the engine runs
in another thread, the gRPC server in the main one). Payloads are read with
``sock_recv_into`` into a preallocated per-connection buffer (ENVIRONMENT.md: about twice
as fast as ``StreamReader.readexactly``), then scattered with ``scatter_layer``. A sender
keeps one persistent connection per receiver address, multiplexes every request's layers
over it, and reconnects after a failure; the receiver acknowledges each transfer once all
its layers are in. Tensors travel through host memory: device tensors are copied to the
CPU before sending and moved to the cache's device on scatter.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVLayout
from kv_transfer.aio import (
    LoopThread,
    format_address,
    parse_address,
    recv_into,
    send_buffers,
    tune,
)
from kv_transfer.connector import (
    KVReceiver,
    KVSender,
    KVTargetSpec,
    PendingTransfer,
    check_target,
)
from kv_transfer.sending import BaseSendHandle, as_bytes, mismatch_reason
from kv_transfer.table import TransferTable
from kv_transfer.wire import (
    HEADER_SIZE,
    FrameHeader,
    FrameKind,
    Status,
    control_frame,
    decode_message,
)

log = logging.getLogger(__name__)

_MAX_IOV = 512  # buffers per sendmsg (Linux allows 1024)
_MAX_BATCH_BYTES = 64 << 20


@dataclass(slots=True, eq=False)
class _RecvConn:
    sock: socket.socket
    peer: str
    task: asyncio.Task[None] | None = None
    flusher: asyncio.Task[None] | None = None
    outbox: deque[bytes] | None = None
    closed: bool = False


class TcpReceiver(KVReceiver):
    """Listens on host:port (port 0: a free one); ``address`` is what senders dial.

    Bound to a wildcard host ("0.0.0.0", "::"), the address names this machine's own IP (its
    hostname resolved, as a Kubernetes pod's is) unless ``advertise_host`` says otherwise.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, early_grace_s: float = 5.0,
                 max_early_bytes: int = 256 << 20, advertise_host: str | None = None) -> None:
        self._table = TransferTable(early_grace_s=early_grace_s,
                                    max_early_bytes=max_early_bytes)
        self._expire_every = max(0.05, min(0.5, early_grace_s / 4))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dualstack = host == "::" and socket.has_dualstack_ipv6()
        self._listener = socket.create_server((host, port), family=family, backlog=256,
                                              dualstack_ipv6=dualstack)
        self._listener.setblocking(False)
        self.address = format_address(advertise_host or _advertised(host),
                                      self._listener.getsockname()[1])
        self._conns: set[_RecvConn] = set()  # loop thread only
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._io = LoopThread(f"kv-recv-{self.address}")
        self._io.call(self._start)

    def expect(self, transfer_id: str, kv_caches: list[torch.Tensor], block_ids: Sequence[int],
               layout: KVLayout) -> PendingTransfer:
        return self._table.expect(transfer_id, kv_caches, block_ids, layout)

    def cancel(self, transfer_id: str) -> None:
        self._table.cancel(transfer_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table.fail_all("the KV receiver closed")  # queues CLOSED replies first
        try:
            self._io.run(self._shutdown(), timeout=5.0)
        except Exception:
            log.exception("KV receiver %s: unclean shutdown", self.address)
        self._io.stop()

    def _start(self) -> None:
        loop = self._io.loop
        self._tasks = [loop.create_task(self._accept_loop()), loop.create_task(self._expire())]

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._listener.close()
        flushers = [c.flusher for c in self._conns if c.flusher is not None]
        if flushers:  # let the CLOSED replies go out before the sockets close
            await asyncio.wait(flushers, timeout=0.5)
        tasks = [c.task for c in self._conns if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._listener)
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                log.warning("KV receiver %s: accept failed: %s", self.address, exc)
                await asyncio.sleep(0.1)
                continue
            tune(sock)
            conn = _RecvConn(sock=sock, peer=str(peer), outbox=deque())
            conn.task = loop.create_task(self._serve(conn))
            self._conns.add(conn)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(self._expire_every)
            self._table.expire_early()

    async def _serve(self, conn: _RecvConn) -> None:
        loop = asyncio.get_running_loop()
        header = bytearray(HEADER_SIZE)
        staging = torch.empty(0, dtype=torch.uint8)
        staging_view = memoryview(b"")
        scratch: memoryview | None = None
        reply = self._replier(conn)
        try:
            while await recv_into(loop, conn.sock, memoryview(header), eof_ok=True):
                frame = FrameHeader.decode(header)
                size = frame.payload_bytes
                if frame.kind == FrameKind.DATA and size > self._table.room_for(frame):
                    scratch = scratch or memoryview(bytearray(1 << 20))
                    while size:  # read and drop, to stay in step with the stream
                        chunk = min(size, len(scratch))
                        await recv_into(loop, conn.sock, scratch[:chunk])
                        size -= chunk
                    self._table.deliver(frame, None, conn, reply)
                elif frame.kind == FrameKind.DATA:
                    if staging.numel() < size:  # grows to the largest layer seen, then reused
                        staging = torch.empty(size, dtype=torch.uint8)
                        staging_view = memoryview(staging.numpy())
                    await recv_into(loop, conn.sock, staging_view[:size])
                    self._table.deliver(frame, staging[:size], conn, reply)
                elif frame.kind == FrameKind.ABORT:
                    body = bytearray(size)
                    await recv_into(loop, conn.sock, memoryview(body))
                    self._table.abort(frame.transfer_id, frame.status, decode_message(body))
                else:
                    raise KVTransferError(f"a sender sent a {frame.kind.name} frame")
        except (KVTransferError, OSError) as exc:
            log.warning("KV receiver %s: dropping connection from %s: %s", self.address,
                        conn.peer, exc)
        finally:
            conn.closed = True
            self._conns.discard(conn)
            self._table.source_lost(conn)
            if conn.flusher is not None:
                # The fd must leave the selector before it is closed (and maybe reused).
                conn.flusher.cancel()
                await asyncio.gather(conn.flusher, return_exceptions=True)
            conn.sock.close()

    def _replier(self, conn: _RecvConn) -> Callable[[str, Status, str], None]:
        """The table's reply callback for frames of ``conn``; callable from any thread."""
        def reply(transfer_id: str, status: Status, message: str) -> None:
            kind = FrameKind.ACK if status == Status.OK else FrameKind.ERROR
            self._io.call(self._queue_reply, conn, control_frame(kind, transfer_id, status,
                                                                 message))
        return reply

    def _queue_reply(self, conn: _RecvConn, frame: bytes) -> None:
        if conn.closed or conn.outbox is None:
            return
        conn.outbox.append(frame)
        if conn.flusher is None or conn.flusher.done():
            conn.flusher = self._io.loop.create_task(self._flush(conn))

    async def _flush(self, conn: _RecvConn) -> None:
        loop = asyncio.get_running_loop()
        assert conn.outbox is not None
        try:
            while conn.outbox:
                frames = list(conn.outbox)
                conn.outbox.clear()
                await send_buffers(loop, conn.sock, frames)
        except OSError as exc:  # the reading side notices and cleans up
            log.warning("KV receiver %s: reply to %s failed: %s", self.address, conn.peer, exc)


def _advertised(host: str) -> str:
    if host not in ("", "0.0.0.0", "::"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(slots=True, eq=False)
class _Item:
    handle: TcpSendHandle
    header: bytes  # for control frames: the whole frame
    payload: torch.Tensor | None  # flat uint8 on the CPU; None for control frames


class _Link:
    """One receiver address on the sender's loop thread: a persistent connection, the send
    queue every request to that address shares, and the handles awaiting its replies."""

    def __init__(self, address: str, connect_timeout: float) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
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
            self.fail(lambda h, gen=gen: h._gen == gen, f"connection lost ({why})")

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
                    buffers += [item.header, memoryview(item.payload.numpy())]
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
    def __init__(self, sender: TcpSender, target: KVTargetSpec, layout: KVLayout) -> None:
        super().__init__(target, layout)
        self._sender = sender
        self._gen: int | None = None  # the connection its frames went on (loop thread)

    def _transmit(self, header: FrameHeader, packed: torch.Tensor) -> None:
        host = packed if packed.device.type == "cpu" else packed.to("cpu")
        item = _Item(self, header.encode(), as_bytes(host))
        if not self._sender._io.call(self._sender._push, self.target.address, item):
            self._lost("the KV sender is closed")

    def _notify_abort(self, status: Status, reason: str) -> None:
        # Sent even if it needs a new connection: the receiver has usually registered the
        # transfer already (decode calls expect() first) and should not wait for a timeout.
        frame = control_frame(FrameKind.ABORT, self.transfer_id, status, reason)
        self._sender._io.call(self._sender._push_abort, _Item(self, frame, None))


class TcpSender(KVSender):
    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self._connect_timeout = connect_timeout
        self._links: dict[str, _Link] = {}  # loop thread only
        self._closed = False
        self._io = LoopThread("kv-send")

    def begin(self, target: KVTargetSpec, layout: KVLayout) -> TcpSendHandle:
        check_target(target, layout)
        parse_address(target.address)
        if self._closed:
            raise KVTransferError("the KV sender is closed")
        handle = TcpSendHandle(self, target, layout)
        reason = mismatch_reason(target, layout)
        if reason is not None:
            handle._abort(Status.LAYOUT_MISMATCH, reason)
            raise LayoutMismatchError(reason)
        self._io.call(self._register, handle)
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

    def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(address, self._connect_timeout)
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
