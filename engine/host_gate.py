"""A CUDA stream held until a host thread says go: the device waits for host work
(a grammar's token masks) instead of the engine thread.

Constrained decoding needs each step's masks before its sampler, and they can only be
computed on the host once the last step's tokens are known. If the engine thread waits for
them before queuing the sampler, the sampler's launches and the next forward's launch all
come after the mask fill, one host chain longer than the device's step (issue 14, on an
H200: ~2.7 ms of host work against a 1.9 ms step at batch 32). With a gate, the engine
queues a wait on the stream, then the mask copy and the sampler behind it, and goes on to
the next step; the mask worker opens the gate when its rows are written.

The wait is a CUDA host function (``cuLaunchHostFunc``, supported on every CUDA device)
that is libc's ``sem_wait`` on a POSIX semaphore, and opening is ``sem_post``: no Python
runs on the driver's callback thread, so the wait needs no GIL. (Stream memory operations,
``cuStreamWaitValue32``, are not available on the H200 we measured on; see
bench/RESULTS.md.) A counting semaphore serves every wait in stream order: the k-th wait
passes after the k-th opening, and each armed ``GateTicket`` is opened exactly once
(``open`` is idempotent), which the owner guarantees by opening it when its job ends
however it ends, and on a bounded wait before reading the step's tokens.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_SEM_T_BYTES = 64  # sem_t is 32 bytes with glibc on x86-64 and aarch64; room to spare


class HostGate:
    """One semaphore and the means to queue waits on it (CUDA only)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._sem = ctypes.create_string_buffer(_SEM_T_BYTES)
        libc.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        if libc.sem_init(self._sem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
        self._sem_post = libc.sem_post
        self._sem_post.argtypes = [ctypes.c_void_p]
        # sem_wait(sem_t *) -> int called as a CUhostFn, void (*)(void *): the same
        # arguments in the same register; the return value is ignored.
        self._wait_fn = ctypes.cast(libc.sem_wait, ctypes.c_void_p)
        cuda = ctypes.CDLL("libcuda.so.1")
        self._launch = cuda.cuLaunchHostFunc
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._launch.restype = ctypes.c_int
        self._open_tickets: set[GateTicket] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device) -> HostGate | None:
        """A gate where the device can wait (CUDA on Linux), else None."""
        if device.type != "cuda":
            return None
        try:
            return cls()
        except (OSError, AttributeError):
            return None

    def arm(self, stream: torch.cuda.Stream | None = None) -> GateTicket:
        """Queue a wait on ``stream`` (the current one by default): what is queued after
        it runs once the returned ticket is opened."""
        stream = stream or torch.cuda.current_stream()
        ticket = GateTicket(self)
        with self._lock:
            self._open_tickets.add(ticket)
        rc = self._launch(ctypes.c_void_p(stream.cuda_stream), self._wait_fn,
                          ctypes.addressof(self._sem))
        if rc != 0:
            with self._lock:
                self._open_tickets.discard(ticket)
            raise RuntimeError(f"cuLaunchHostFunc failed (CUresult {rc})")
        return ticket

    def _post(self, ticket: GateTicket) -> bool:
        with self._lock:
            if ticket not in self._open_tickets:
                return False
            self._open_tickets.discard(ticket)
        self._sem_post(self._sem)
        return True

    def close(self) -> None:
        """Open every ticket still armed, so that no stream waits on a gate no one
        will open (the semaphore lives as long as this object)."""
        with self._lock:
            tickets = list(self._open_tickets)
        for ticket in tickets:
            ticket.open()


class GateTicket:
    """One armed wait; ``open`` lets the stream go on (once, whoever calls it first)."""

    __slots__ = ("__weakref__", "_gate")

    def __init__(self, gate: HostGate) -> None:
        self._gate = gate

    def open(self) -> bool:
        """True if this call opened it."""
        return self._gate._post(self)
