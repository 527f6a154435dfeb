"""The host-memory tier: encoded chunk values in this process's RAM, LRU within a byte budget.

Entries are whole encoded values (header + payload) so that one copy serves a hit, a
write-through to Redis and an offload alike. They were encoded here or checked on their
way in from Redis, so a hit re-checks the header (cheap) but not the payload checksum.
Thread-safe: the engine's thread and the tier's I/O thread both use it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

Value = bytes | bytearray | memoryview


class HostTier:
    def __init__(self, budget_bytes: int,
                 on_evict: Callable[[int], None] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("the host tier's budget cannot be negative")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, Value] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict  # called with the number of entries evicted

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Value | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def contains(self, key: bytes) -> bool:
        """Presence only: a look-up does not make an entry recently used, a load does."""
        with self._lock:
            return key in self._entries

    def leading(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            n = 0
            while n < len(keys) and keys[n] in self._entries:
                n += 1
            return n

    def put(self, key: bytes, value: Value) -> bool:
        """Keep ``value`` under ``key``, evicting least recently used entries to fit; False if
        it is larger than the whole budget (then nothing is evicted)."""
        size = len(value)
        if size > self.budget_bytes:
            return False
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            while self._bytes + size > self.budget_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
                evicted += 1
            self._entries[key] = value
            self._bytes += size
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
        return True

    def discard(self, key: bytes) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
