"""Plumbing of the socket backends: an asyncio loop in a daemon thread, exact reads into
preallocated buffers, socket options, and ``host:port`` addresses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad tcp KV address {address!r} (want host:port)")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_host(host: str) -> str:
    """The host peers should dial for a listener bound to ``host``: a wildcard names this
    machine's own IP (its hostname resolved, as a Kubernetes pod's is)."""
    if host not in ("", "0.0.0.0", "::"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._inbox_lock = threading.Lock()
        self._wake_pending = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop soon, in call order; False if the loop is gone.

        Calls made while a wake-up is pending ride on it: one self-pipe write per batch
        rather than per layer (per-call wake-ups were a tenth of the sender's time)."""
        with self._inbox_lock:
            if self._stopped:
                return False
            self._inbox.append((fn, args))
            if self._wake_pending:
                return True
            self._wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
            return True
        except RuntimeError:  # the loop is closed
            return False

    def _drain(self) -> None:
        with self._inbox_lock:
            batch = list(self._inbox)
            self._inbox.clear()
            self._wake_pending = False
        for fn, args in batch:
            try:
                fn(*args)
            except Exception:
                log.exception("KV transfer loop: %s failed", getattr(fn, "__name__", fn))

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        with self._inbox_lock:
            self._stopped = True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


async def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview,
                     *, eof_ok: bool = False) -> bool:
    """Fill ``view`` from ``sock``. False on a clean EOF before any byte (if ``eof_ok``)."""
    got, total = 0, len(view)
    while got < total:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            if got == 0 and eof_ok:
                return False
            raise ConnectionError(f"peer closed the connection mid-frame ({got}/{total} bytes)")
        got += n
    return True


async def send_buffers(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                       buffers: list[memoryview | bytes]) -> None:
    """Write every buffer, in order, with vectored ``sendmsg`` calls on a non-blocking
    socket, waiting for writability only when the kernel's buffer is full."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock)
            continue
        while sent:
            head = views[0]
            if sent >= len(head):
                sent -= len(head)
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    # Acks and headers are small; do not let Nagle hold them back.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
