"""Fixtures for the connector suites: receiver/sender ends of a backend built over
caches the test makes (the pod's registered KV memory), and a ``closing`` list for ends a
test builds itself; everything is closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import pytest
import torch

from engine.kv_layout import KVLayout, KVMemory
from kv_transfer import (
    ConnectorConfig,
    KVReceiver,
    KVSender,
    introduce,
    make_receiver,
    make_sender,
)


class _Closable(Protocol):
    def close(self) -> None: ...


Ends = tuple[KVReceiver, KVSender]
MakeEnds = Callable[..., Ends]


@pytest.fixture
def closing() -> Iterator[list[_Closable]]:
    ends: list[_Closable] = []
    yield ends
    for end in reversed(ends):
        end.close()


@pytest.fixture
def connector_ends(closing: list[_Closable]) -> MakeEnds:
    """``connector_ends(kind, layout, src, dst, sender_layout=None, config=None)``: a
    receiver over ``dst`` and a sender over ``src`` (per-layer caches) of backend ``kind``;
    ``sender_layout`` gives the sender another layout (a mismatch)."""

    def make(kind: str, layout: KVLayout, src: list[torch.Tensor], dst: list[torch.Tensor],
             sender_layout: KVLayout | None = None,
             config: ConnectorConfig | None = None) -> Ends:
        receiver = make_receiver(kind, KVMemory(layout, tuple(dst)), config)
        closing.append(receiver)
        sender = make_sender(kind, KVMemory(sender_layout or layout, tuple(src)), config)
        closing.append(sender)
        introduce(receiver, sender)
        return receiver, sender

    return make
