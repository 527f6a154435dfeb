"""The host side of an nccl link: one TCP connection that carries the link's headers.

Why not send the headers over NCCL itself: a receive posted while a link is idle stays
pending on the decode GPU until the next transfer comes, and other work waits behind it
(seen on two H200s: the decode process's next read of its own cache, on the default
stream, hung until the next header came -- which never did, since that process was the one
to ask for it). So the receiver posts a receive only for bytes that are on their way: the
sender writes each batch's header here once its layers are written on the GPU, and the
receiver posts exactly the receives it announces, in the order they come. The same
connection tells each end at once when the other one goes away (EOF), which NCCL never does.

A sender opens the connection in its handshake and presents the key the receiver offered in
its peer info (the communicator's unique id and a fresh random secret): a connection that
presents no offered key is closed, so only the peer the handshake introduced is heard.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

from engine.errors import KVTransferError
from kv_transfer.aio import advertised_host, format_address, parse_address
from kv_transfer.backends.nccl.protocol import HEADER_BYTES, UID_BYTES, Header

log = logging.getLogger(__name__)
SECRET_BYTES = 32
KEY_BYTES = UID_BYTES + SECRET_BYTES


class Control:
    """One connected end: whole headers out, whole headers in."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._partial = bytearray()

    def send(self, head: Header) -> None:
        try:
            self.sock.sendall(head.encode())
        except OSError as exc:
            raise KVTransferError(f"the nccl control connection failed: {exc}") from None

    def read(self, timeout: float) -> Header | None:
        """The next header, or None if none came within ``timeout`` (a header cut short by
        the timeout is kept for the next call). KVTransferError once the peer is gone."""
        self.sock.settimeout(timeout)
        try:
            while len(self._partial) < HEADER_BYTES:
                chunk = self.sock.recv(HEADER_BYTES - len(self._partial))
                if not chunk:
                    raise KVTransferError("the nccl peer closed its control connection")
                self._partial += chunk
        except (TimeoutError, BlockingIOError):
            return None
        except OSError as exc:
            raise KVTransferError(f"the nccl control connection failed: {exc}") from None
        raw, self._partial = bytes(self._partial), bytearray()
        return Header.decode(raw)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(address: str, key: bytes, timeout: float) -> Control:
    """Sender side: dial the receiver's control address and present the offered key."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.sendall(key)
    except OSError as exc:
        raise KVTransferError(f"cannot reach the nccl receiver's control address "
                              f"{address}: {exc}") from None
    return Control(sock)


class ControlListener:
    """Receiver side: accepts senders' connections and holds each under the key it
    presented until the link that expects it takes it."""

    def __init__(self, host: str, port: int, advertise_host: str | None,
                 timeout_s: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.create_server((host, port), family=family, backlog=64)
        self.address = format_address(advertise_host or advertised_host(host),
                                      self._server.getsockname()[1])
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._expected: dict[bytes, float] = {}  # key -> when it was offered
        self._arrived: dict[bytes, socket.socket] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name="nccl-control")
        self._thread.start()

    def expect(self, key: bytes) -> None:
        with self._cond:
            t = time.monotonic()
            self._expected = {k: at for k, at in self._expected.items()
                              if t - at < 60.0 or k in self._arrived}
            self._expected[key] = t

    def take(self, key: bytes, timeout: float) -> Control:
        """The connection that presented ``key``, once it has come."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._arrived:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    self._expected.pop(key, None)
                    raise KVTransferError(f"the nccl sender did not open its control "
                                          f"connection within {timeout:g}s")
                self._cond.wait(left)
            self._expected.pop(key, None)
            return Control(self._arrived.pop(key))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            arrived = list(self._arrived.values())
            self._arrived.clear()
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for sock in arrived:
            sock.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._server.accept()
            except OSError:
                return  # closed
            key = bytearray()
            try:
                sock.settimeout(self.timeout_s)
                while len(key) < KEY_BYTES:
                    chunk = sock.recv(KEY_BYTES - len(key))
                    if not chunk:
                        break
                    key += chunk
            except OSError:
                pass
            with self._cond:
                if len(key) == KEY_BYTES and bytes(key) in self._expected \
                        and not self._closed:
                    self._arrived[bytes(key)] = sock
                    self._cond.notify_all()
                    continue
            log.warning("nccl control: dropped a connection from %s without an offered key",
                        peer)
            sock.close()
