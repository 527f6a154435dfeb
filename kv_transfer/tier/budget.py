"""A bound on bytes in flight, shared by a caller thread (non-blocking reservations for
stores) and the tier's I/O loop (awaited reservations for loads; every release)."""

from __future__ import annotations

import asyncio
import threading
import time


class ByteBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a byte budget must be positive")
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._freed: asyncio.Event | None = None  # made on the loop, at first wait

    @property
    def used(self) -> int:
        return self._used

    def _clamp(self, n: int) -> int:
        # One reservation larger than the whole budget takes all of it: it runs alone.
        return min(n, self.limit)

    def try_acquire(self, n: int) -> bool:
        """Reserve ``n`` bytes now or not at all (any thread)."""
        n = self._clamp(n)
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    async def acquire(self, n: int, timeout: float) -> None:
        """Reserve ``n`` bytes, waiting up to ``timeout`` seconds (on the I/O loop only)."""
        deadline = time.monotonic() + timeout
        if self._freed is None:
            self._freed = asyncio.Event()
        while True:
            if self.try_acquire(n):
                return
            self._freed.clear()
            if self.try_acquire(n):  # a release may have come between the try and the clear
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no room for {n} bytes in flight within {timeout:.1f} s")
            await asyncio.wait_for(self._freed.wait(), remaining)

    def release(self, n: int) -> None:
        """Give back a reservation (on the I/O loop only: it wakes the loop's waiters)."""
        n = self._clamp(n)
        with self._lock:
            self._used -= n
            assert self._used >= 0, "released more bytes than were reserved"
        if self._freed is not None:
            self._freed.set()
