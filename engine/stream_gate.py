"""StreamGate: GPU work queued now that runs only once the host says its data is ready.

Why: with async scheduling (engine/step_pipeline.py) a constrained step's grammar masks
can only be filled once the last step's tokens are known, i.e. while this step's forward
runs. Were the engine thread to wait for the fill before queuing the sampler, the next
step's forward could only be launched after the fill too, and the GPU would idle for the
host's whole fill-then-launch chain (on an H200, a JSON step at batch 32: 2.8 ms against
1.7 unconstrained). A gate puts the wait on the stream instead: the sampler's mask copy and
everything after it are queued at once behind a one-program kernel that spins on a counter
in pinned host memory, and the mask worker bumps the counter once its rows are written.

Why a kernel and not ``cuStreamWaitValue32``: the driver's stream memory operations are off
on the H200s we measured on (CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS is 0; a wait on host
or device memory then never passes), while a volatile load of mapped host memory works on
every CUDA GPU. A gate that never opens would stall the stream, so every ticket taken is
opened (by the worker when its fill ends however it ends, by the engine when the fill
outlives its timeout) and the kernel gives up after a bounded spin, saying so in
``expired`` (the engine then fails the rows it guarded).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any

import torch

log = logging.getLogger(__name__)
# A spin is one volatile load of host memory over the bus (~1 us): about two minutes, well
# past the mask fill's own timeout, after which the engine has opened the gate anyway.
MAX_SPINS = 1 << 27
_PROBE_SPINS = 1 << 20  # the self-test's bound: about a second


def _wrap(x: int) -> int:
    """``x`` as a signed 32-bit integer (tickets wrap around, compared cyclically)."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def gate_kernel(counter_ptr, expired_ptr, ticket, max_spins):
        # (counter - ticket) as int32 >= 0: a cyclic greater-or-equal, so tickets may wrap
        seen = tl.load(counter_ptr, volatile=True)
        spins = 0
        while ((seen - ticket) < 0) & (spins < max_spins):
            seen = tl.load(counter_ptr, volatile=True)
            spins += 1
        if spins >= max_spins:
            tl.store(expired_ptr, 1)

    return gate_kernel


class StreamGate:
    """A host-written counter that a CUDA stream waits on: ``ticket()`` names the next
    opening, ``hold(ticket)`` queues the wait on the current stream, ``open(ticket)`` lets
    every wait up to it pass; ``expired`` (on the device) is set by a wait that gave up."""

    def __init__(self, device: torch.device) -> None:
        self._kernel = _kernel()
        # pinned, so mapped into the GPU's address space at the same address (UVA)
        self._counter = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._host = ctypes.c_int32.from_address(self._counter.data_ptr())
        self.expired = torch.zeros(1, dtype=torch.int32, device=device)
        self._issued = 0
        self._lock = threading.Lock()  # the worker and the engine both open tickets

    @classmethod
    def create(cls, device: torch.device) -> StreamGate | None:
        """A gate on ``device``, checked once; None (and the reason logged) where the GPU
        does not see the host's writes or Triton cannot run."""
        if device.type != "cuda":
            return None
        try:
            with torch.cuda.device(device):
                gate = cls(device)
                ticket = gate.ticket()
                gate.hold(ticket, _PROBE_SPINS)
                done = torch.cuda.Event()
                done.record()
                time.sleep(0.002)
                held = not done.query()
                gate.open(ticket)
                done.synchronize()
                if not held or int(gate.expired.item()):
                    raise RuntimeError("the GPU did not wait for the host's write"
                                       if not held else "the GPU never saw the host's write")
            return gate
        except Exception as exc:  # Triton missing, a driver refusing mapped memory, ...
            log.warning("no stream gate (%s): grammar masks are waited for on the host", exc)
            return None

    def ticket(self) -> int:
        with self._lock:
            self._issued = _wrap(self._issued + 1)
            return self._issued

    def hold(self, ticket: int, max_spins: int = MAX_SPINS) -> None:
        """Work queued on the current stream after this waits for ``open(ticket)``."""
        self._kernel[(1,)](self._counter, self.expired, ticket, max_spins, num_warps=1)

    def open(self, ticket: int) -> None:
        """Let waits up to ``ticket`` pass (after the data they guard is written)."""
        with self._lock:
            if _wrap(ticket - self._host.value) > 0:  # never back (cyclic, as the kernel)
                self._host.value = ticket

    def open_all(self) -> None:
        """Every ticket taken so far (shutting down: nothing may stay stalled)."""
        self.open(self._issued)
