"""The ucx backend's notifications as bytes: what a peer may send, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import KVTransferError
from kv_transfer.backends.ucx.protocol import Notif, layer_span
from kv_transfer.backends.ucx.staging import (
    Staging,
    block_addresses,
    num_runs,
    packed_addresses,
    pieces,
)


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


def test_pieces_merge_blocks_consecutive_on_both_sides() -> None:
    src = block_addresses(1000, 16, 10, 0, [4, 5, 6, 9])
    dst = block_addresses(5000, 32, 10, 1, [10, 11, 12, 13])  # V half: +32 blocks
    local, remote = pieces(src, dst, 10, 0, 1)
    assert local.tolist() == [[1040, 30, 0], [1090, 10, 0]]
    assert remote.tolist() == [[5420, 30, 1], [5450, 10, 1]]
    # into a staging slot: the receiver's side is one run, the sender's still two
    local, remote = pieces(src, packed_addresses(7000, 4, 10), 10, 0, 0)
    assert local[:, 1].tolist() == [30, 10] and remote[:, 0].tolist() == [7000, 7030]
    assert num_runs([3, 4, 5]) == 1 and num_runs([5, 4]) == 2 and num_runs([]) == 0


def test_staging_slots_are_cut_first_fit_and_merge_back() -> None:
    import torch

    area = Staging(torch.empty(4096, dtype=torch.uint8), align=256)
    a, b, c = area.alloc(1000), area.alloc(256), area.alloc(2816)
    assert (a, b, c) == (0, 1024, 1280) and area.alloc(1) is None
    area.free(b, 256)
    assert area.alloc(300) is None and area.alloc(200) == 1024  # the hole fits 256 only
    area.free(1024, 200)
    area.free(a, 1000)
    area.free(c, 2816)
    assert area.alloc(4096) == 0  # all merged back into one
    assert np.asarray(area.view(0, 16)).shape == (16,)
