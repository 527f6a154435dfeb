"""One NCCL link: a 2-rank communicator between a prefill pod's GPU (rank 0, sends) and a
decode pod's GPU (rank 1, receives), through nccl4py.

Created non-blocking, so nothing waits on NCCL without a bound: init and every posted
operation are polled (``ncclInProgress``) until done or a deadline, and ``abort`` (which
NCCL needs to notice a dead peer at all: a receive from a killed process never returns by
itself) ends whatever is in flight and unblocks a thread stuck on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from engine.errors import KVTransferError

log = logging.getLogger(__name__)
IN_PROGRESS = 7  # ncclInProgress
SENDER_RANK, RECEIVER_RANK = 0, 1
LAYERS_PER_GROUP = 8  # layers whose K and V sends (or receives) go in one NCCL group
SLOW_POST_S = 0.02  # a post that holds its link's thread longer is logged, by part


@dataclass(slots=True)
class PostTimer:
    """Host time of one post on a link's thread, by part, logged when the whole is slow:
    under load on two H200s a transfer's completion was seen a whole prefill step late
    (bench/RESULTS.md, 2026-12-01), and this says which call held the thread."""

    parts: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)
    _first: float = 0.0

    def __post_init__(self) -> None:
        self._first = self._last

    def mark(self, part: str) -> None:
        t = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + t - self._last
        self._last = t

    def report(self, what: str) -> None:
        total = self._last - self._first
        if total > SLOW_POST_S:
            log.warning("%s held the link's thread %.1f ms: %s", what, 1e3 * total,
                        ", ".join(f"{k} {1e3 * v:.1f}" for k, v in self.parts.items()))


def nccl_missing(device: str) -> str | None:
    """Why the nccl connector cannot run for KV on ``device`` here, or None."""
    if device != "cuda":
        return "it moves GPU memory only (KV on the CPU: use tcp or ucx)"
    try:
        import nccl.core  # noqa: F401
    except ImportError as exc:
        return f"nccl4py is not installed ({exc}); `pip install nccl4py==0.6.0`"
    return None


def new_unique_id() -> bytes:
    import nccl.core as nccl

    return bytes(nccl.get_unique_id().as_bytes)


def _status(exc: BaseException) -> int | None:
    for name in ("status", "code", "result"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            return value
    return IN_PROGRESS if "InProgress" in str(exc) or "in progress" in str(exc) else None


class Link:
    def __init__(self, unique_id: bytes, rank: int, device: torch.device,
                 timeout_s: float) -> None:
        import nccl.core as nccl

        self.rank = rank
        self.peer = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK
        self.device = device
        self.timeout_s = timeout_s
        self.stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()
        self._aborted = False
        self.error = ""
        self.progress_at = time.monotonic()  # when data last moved (the owner sets it)
        self.looked_at = time.monotonic()  # when the owner last checked its events
        with torch.cuda.device(device):
            self.comm = nccl.Communicator.init(
                2, rank, nccl.UniqueId.from_bytes(unique_id),
                config=nccl.NCCLConfig(blocking=False))
        self._ready = False

    def look(self, pending: int) -> None:
        """The owner's thread is looking at its events now: log if it was kept away from
        them past SLOW_POST_S while some were pending (their completion is seen that late)."""
        t = time.monotonic()
        if pending and t - self.looked_at > SLOW_POST_S:
            log.warning("the link's thread looked at its %d pending events after %.1f ms",
                        pending, 1e3 * (t - self.looked_at))
        self.looked_at = t

    def wait_ready(self) -> None:
        """Poll the non-blocking init until it is done (both ranks joined)."""
        if self._ready:
            return
        self._poll("communicator init")
        self._ready = True

    def _poll(self, what: str) -> None:
        """Wait until NCCL has finished enqueueing (non-blocking communicators launch in a
        thread of their own and say ncclInProgress meanwhile): spin for the first
        millisecond -- that is how long it usually takes, and a 0.5 ms sleep per call cost
        16 ms per 32-layer transfer -- then back off."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        while True:
            if self._aborted:
                raise KVTransferError(f"NCCL link aborted during {what}: {self.error}")
            state = int(self.comm.get_async_error())
            if state == 0:
                return
            if state != IN_PROGRESS:
                self.abort(f"NCCL error {state} during {what}")
                raise KVTransferError(f"NCCL error {state} during {what}")
            if time.monotonic() > deadline:
                self.abort(f"{what} not done within {self.timeout_s:g}s")
                raise KVTransferError(f"NCCL {what} not done within {self.timeout_s:g}s")
            if time.monotonic() - t0 > 0.001:
                time.sleep(0.0002)

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        """Post one operation, then wait until NCCL has enqueued it: a non-blocking
        communicator may still be enqueueing (ncclInProgress), and until it is done nothing
        else may be issued on its stream -- a copy issued early would run before the
        receive it is meant to follow."""
        try:
            fn()
        except Exception as exc:
            if _status(exc) != IN_PROGRESS:
                self.abort(f"{what}: {exc}")
                raise KVTransferError(f"NCCL {what} failed: {exc}") from None
        self._poll(what)

    def send(self, *tensors: torch.Tensor) -> None:
        """Enqueue sends of ``tensors`` (contiguous bytes), in order, as one NCCL group on
        this link's stream."""
        stream = self.stream.cuda_stream
        self._group("send", [partial(self.comm.send, t, self.peer, stream=stream)
                             for t in tensors])

    def recv(self, *tensors: torch.Tensor) -> None:
        stream = self.stream.cuda_stream
        self._group("recv", [partial(self.comm.recv, t, self.peer, stream=stream)
                             for t in tensors])

    def _group(self, what: str, ops: list[Callable[[], Any]]) -> None:
        import nccl.core as nccl

        self.wait_ready()
        if len(ops) == 1:
            self._call(what, ops[0])
            return

        def grouped() -> None:
            nccl.group_start()
            try:
                for op in ops:
                    op()
            finally:
                nccl.group_end()

        self._call(what, grouped)

    def synchronize(self, what: str) -> None:
        """Wait for this link's stream, bounded: a peer that stopped leaves it pending
        forever, so past the deadline the communicator is aborted (which ends it)."""
        done = torch.cuda.Event()
        done.record(self.stream)
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if self._aborted:
                raise KVTransferError(f"NCCL link aborted during {what}: {self.error}")
            if time.monotonic() > deadline:
                self.abort(f"{what} not done within {self.timeout_s:g}s")
                raise KVTransferError(f"NCCL {what} not done within {self.timeout_s:g}s")
            time.sleep(0.0001)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self, why: str) -> None:
        """End the communicator and everything in flight on it (idempotent)."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self.error = why
        log.warning("aborting an NCCL link (rank %d): %s", self.rank, why)
        try:
            self.comm.abort()
        except Exception:
            log.exception("ncclCommAbort failed")
