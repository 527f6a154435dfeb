"""Fixtures for the connector suites: connected receiver/sender pairs of each backend, and
a ``closing`` list for ends a test builds itself; everything is closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from kv_transfer import KVReceiver, KVSender, LocalHub, make_receiver, make_sender


class _Closable(Protocol):
    def close(self) -> None: ...


Pair = tuple[KVReceiver, KVSender]


@pytest.fixture
def closing() -> Iterator[list[_Closable]]:
    ends: list[_Closable] = []
    yield ends
    for end in reversed(ends):
        end.close()


@pytest.fixture
def connector_pair(closing: list[_Closable]) -> Callable[[str], Pair]:
    """``connector_pair(kind)`` -> a receiver and a sender of that backend."""

    def make(kind: str) -> Pair:
        hub = LocalHub()
        receiver = make_receiver(kind, hub=hub)
        sender = make_sender(kind, hub=hub)
        closing.extend([receiver, sender])
        return receiver, sender

    return make
