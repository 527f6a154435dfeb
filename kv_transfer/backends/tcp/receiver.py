"""The receiving end of the ``tcp`` backend (the protocol is described in sender.py).

One asyncio loop in a daemon thread accepts senders' connections; each connection reads
frame headers and payloads with ``sock_recv_into`` into a per-connection buffer that is
reused, hands them to the ``TransferTable`` (which checks and scatters them), and sends the
table's replies back on the connection they belong to.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVMemory
from kv_transfer.aio import (
    LoopThread,
    advertised_host,
    format_address,
    recv_into,
    send_buffers,
    tune,
)
from kv_transfer.backends.tcp.challenge import admit
from kv_transfer.connector import ConnectorConfig, KVReceiver, PendingTransfer
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

    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        self._table = TransferTable(memory, early_grace_s=config.early_grace_s,
                                    max_early_bytes=config.max_early_bytes)
        self._expire_every = max(0.05, min(0.5, config.early_grace_s / 4))
        self._token = config.token  # senders must prove they hold it (challenge.py)
        self._admit_timeout = config.connect_timeout_s
        host, port, advertise_host = config.host, config.port, config.advertise_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dualstack = host == "::" and socket.has_dualstack_ipv6()
        self._listener = socket.create_server((host, port), family=family, backlog=256,
                                              dualstack_ipv6=dualstack)
        self._listener.setblocking(False)
        self.address = format_address(advertise_host or advertised_host(host),
                                      self._listener.getsockname()[1])
        self._conns: set[_RecvConn] = set()  # loop thread only
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._io = LoopThread(f"kv-recv-{self.address}")
        self._io.call(self._start)

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        return self._table.expect(transfer_id, block_ids)

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
            if self._token is not None and not await admit(loop, conn.sock, self._token,
                                                            self._admit_timeout):
                log.warning("KV receiver %s: refused %s: no valid token proof", self.address,
                            conn.peer)
                return
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
                        staging_view = memoryview(staging.numpy().data)
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
                frames: list[memoryview | bytes] = list(conn.outbox)
                conn.outbox.clear()
                await send_buffers(loop, conn.sock, frames)
        except OSError as exc:  # the reading side notices and cleans up
            log.warning("KV receiver %s: reply to %s failed: %s", self.address, conn.peer, exc)

