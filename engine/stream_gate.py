"""StreamGate: GPU work queued now that runs only once the host says its data is ready.

Why: with async scheduling (engine/step_pipeline.py) a constrained step's grammar masks
can only be filled once the last step's tokens are known, i.e. while this step's forward
runs. Were the engine thread to wait for the fill before queuing the sampler, the next
step's forward could only be launched after the fill too, and the GPU would idle for the
host's whole fill-then-launch chain (on an H200, a JSON step at batch 32: 2.8 ms against
1.8 unconstrained). A gate puts the wait on the stream instead: the sampler's mask copy and
everything after it are queued at once behind a ``cuStreamWaitValue32`` on a counter in
pinned host memory, and the mask worker bumps the counter when its rows are written.

CUDA's driver API through ctypes (torch exposes no stream memory operations). Made only
where the driver supports them; else ``create`` gives None and the engine waits for its
masks on the host as before. A gate that is never opened would stall the stream for good,
so every ticket taken is opened: by the worker when its fill ends however it ends, and by
the engine if the fill outlives its timeout.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

log = logging.getLogger(__name__)
_PORTABLE, _DEVICEMAP = 0x01, 0x02  # CU_MEMHOSTALLOC_PORTABLE, CU_MEMHOSTALLOC_DEVICEMAP


class StreamGate:
    """A host-written counter that a CUDA stream can wait on: ``ticket()`` names the next
    opening, ``hold(ticket)`` queues a wait for it on the current stream, ``open(ticket)``
    lets every wait up to it pass."""

    def __init__(self, wait_fn: ctypes._CFuncPtr,  # type: ignore[name-defined]
                 device_ptr: int, host_ptr: int) -> None:
        self._wait = wait_fn
        self._device_ptr = device_ptr
        # the counter: 4 bytes of pinned, device-mapped host memory (cuMemHostAlloc), held
        # for the process's life; the GPU polls it where it lives
        self._host = ctypes.c_uint32.from_address(host_ptr)
        self._issued = 0  # tickets wrap around 2**32, compared cyclically as the GPU does
        self._lock = threading.Lock()  # the worker and the engine both open tickets

    @classmethod
    def create(cls, device: torch.device) -> StreamGate | None:
        """A gate on ``device``'s streams, or None where the driver cannot make one (then
        the reason is logged)."""
        if device.type != "cuda":
            return None
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
            with torch.cuda.device(device):
                torch.cuda.current_stream()  # the primary context is current on this thread
                host = ctypes.c_void_p()
                err = cuda.cuMemHostAlloc(ctypes.byref(host), 64, _DEVICEMAP | _PORTABLE)
                if err != 0 or host.value is None:
                    raise RuntimeError(f"cuMemHostAlloc: CUresult {err}")
                addr: int = host.value
                ctypes.c_uint32.from_address(addr).value = 0
                ptr = ctypes.c_uint64()
                err = cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(ptr), host, 0)
                if err != 0:
                    raise RuntimeError(f"cuMemHostGetDevicePointer: CUresult {err}")
                wait = cuda.cuStreamWaitValue32_v2
                wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32,
                                 ctypes.c_uint]
                gate = cls(wait, ptr.value, addr)
                gate.hold(0)  # passes at once (0 >= 0); fails where the driver has no mem ops
            return gate
        except (OSError, AttributeError, RuntimeError) as exc:
            log.warning("no stream memory operations (%s): grammar masks are waited for on "
                        "the host", exc)
            return None

    def ticket(self) -> int:
        with self._lock:
            self._issued = (self._issued + 1) & 0xFFFFFFFF
            return self._issued

    def hold(self, ticket: int) -> None:
        """Work queued on the current stream after this waits for ``open(ticket)``."""
        stream = torch.cuda.current_stream().cuda_stream
        # flags 0: wait until (int32)(*counter - ticket) >= 0, a cyclic greater-or-equal
        result = self._wait(ctypes.c_void_p(stream), self._device_ptr, ticket, 0)
        if result != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed (CUresult {result})")

    def open(self, ticket: int) -> None:
        """Let waits up to ``ticket`` pass (after the data they guard is written)."""
        with self._lock:
            if (ticket - self._host.value) & 0xFFFFFFFF < 1 << 31:  # never moves back
                self._host.value = ticket

    def open_all(self) -> None:
        """Every ticket taken so far (shutting down: nothing may stay stalled)."""
        self.open(self._issued)
