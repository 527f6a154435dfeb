"""The ucx backend's notifications as bytes: what a peer may send, and what is refused."""

from __future__ import annotations

import pytest

from engine.errors import KVTransferError
from kv_transfer.backends.ucx.protocol import Notif, layer_span, runs


@pytest.mark.parametrize("arg,span", [("7", range(7, 8)), ("0-31", range(0, 32)),
                                      ("3-3", range(3, 4))])
def test_a_write_names_one_layer_or_a_run_of_layers(arg: str, span: range) -> None:
    notif = Notif.decode(Notif("D", "req-1", arg).encode())
    assert notif == Notif("D", "req-1", arg) and layer_span(notif.arg) == span


@pytest.mark.parametrize("raw", [b"D|req-1|", b"D|req-1|x", b"D|req-1|5-2", b"D|req-1|-3",
                                 b"D|req-1|1-", b"D|req-1|1234567", b"Z|req-1|1",
                                 b"D|req 1|1", b"D"])
def test_junk_notifications_are_refused(raw: bytes) -> None:
    with pytest.raises(KVTransferError):
        Notif.decode(raw)


def test_runs_merge_blocks_consecutive_on_both_sides() -> None:
    assert runs([4, 5, 6, 9], [10, 11, 12, 13]) == [(4, 10, 3), (9, 13, 1)]
    assert runs([6, 5], [1, 2]) == [(6, 1, 1), (5, 2, 1)]
