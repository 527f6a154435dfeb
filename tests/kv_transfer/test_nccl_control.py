"""The nccl backend's host side, which runs without a GPU: its handshake and header bytes,
the control connection that announces each batch (real sockets on 127.0.0.1), and the
link threads' slow-post log."""

from __future__ import annotations

import os
import socket
import time

import pytest

from engine.errors import KVTransferError
from kv_transfer.backends.nccl.control import KEY_BYTES, SECRET_BYTES, ControlListener, connect
from kv_transfer.backends.nccl.protocol import (
    ABORT,
    DATA,
    ROLE_RECEIVER,
    ROLE_SENDER,
    UID_BYTES,
    Header,
    Hello,
    one_run,
)


def test_hello_and_header_round_trip_and_refuse_junk() -> None:
    hello = Hello(ROLE_RECEIVER, os.urandom(UID_BYTES), "fp-1", "nccl-abc", "127.0.0.1:5555",
                  os.urandom(SECRET_BYTES))
    back = Hello.decode(hello.encode(), ROLE_RECEIVER)
    assert back == hello and len(back.key) == KEY_BYTES
    with pytest.raises(KVTransferError):
        Hello.decode(hello.encode(), ROLE_SENDER)  # the wrong role
    with pytest.raises(KVTransferError):
        Hello.decode(hello.encode()[:-1], ROLE_RECEIVER)
    head = Header(DATA, "req-1", layer=3, num_layers=29, num_blocks=512)
    assert Header.decode(head.encode()) == head
    with pytest.raises(KVTransferError):
        Header.decode(b"X" * len(head.encode()))


def test_one_run() -> None:
    assert one_run([4, 5, 6]) == 4
    assert one_run([7]) == 7
    assert one_run([4, 6]) is None and one_run([5, 4]) is None and one_run([]) is None


def test_control_carries_headers_to_the_key_holder_only() -> None:
    listener = ControlListener("127.0.0.1", 0, None, timeout_s=2.0)
    try:
        key = os.urandom(KEY_BYTES)
        listener.expect(key)
        stranger = socket.create_connection(("127.0.0.1", int(listener.address.split(":")[1])))
        stranger.sendall(os.urandom(KEY_BYTES))  # a key nobody offered: dropped
        assert stranger.recv(1) == b""
        stranger.close()
        sender = connect(listener.address, key, timeout=2.0)
        receiver = listener.take(key, timeout=2.0)
        assert receiver.read(0.01) is None  # nothing announced yet
        assert receiver.read(0.0) is None  # a look without waiting
        heads = [Header(DATA, f"t{i}", i, 1, 8) for i in range(3)] + [Header(ABORT, "t1")]
        raw = b"".join(h.encode() for h in heads)
        sender.sock.sendall(raw[:100])  # a header cut short waits for its rest
        assert receiver.read(0.05) is None
        sender.sock.sendall(raw[100:])
        assert [receiver.read(1.0) for _ in heads[:3]] == heads[:3]
        deadline = time.monotonic() + 2
        while (last := receiver.read(0.0)) is None:
            assert time.monotonic() < deadline
        assert last == heads[3]
        sender.close()  # the peer going away is noticed at once, not after a timeout
        with pytest.raises(KVTransferError, match="closed"):
            receiver.read(1.0)
        receiver.close()
    finally:
        listener.close()


def test_a_sender_that_never_connects_times_out() -> None:
    listener = ControlListener("127.0.0.1", 0, None, timeout_s=1.0)
    try:
        key = os.urandom(KEY_BYTES)
        listener.expect(key)
        t0 = time.monotonic()
        with pytest.raises(KVTransferError, match="did not open"):
            listener.take(key, timeout=0.3)
        assert time.monotonic() - t0 < 2.0
    finally:
        listener.close()
    with pytest.raises(KVTransferError, match="cannot reach"):
        connect(listener.address, key, timeout=1.0)


def test_a_slow_post_is_logged_by_part_and_a_quick_one_is_not(caplog) -> None:
    import logging

    from kv_transfer.backends.nccl.link import SLOW_POST_S, PostTimer

    caplog.set_level(logging.WARNING, logger="kv_transfer.backends.nccl.link")
    quick = PostTimer()
    quick.mark("header")
    quick.report("posting a quick batch")
    slow = PostTimer()
    slow.mark("header")
    time.sleep(SLOW_POST_S * 1.5)
    slow.mark("send")
    slow.report("posting a slow batch")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "posting a slow batch" in messages[0]
    assert "send " in messages[0] and "header " in messages[0]


def test_a_link_thread_kept_away_from_pending_events_is_logged(caplog) -> None:
    import logging
    from types import SimpleNamespace

    from kv_transfer.backends.nccl.link import SLOW_POST_S, Link

    caplog.set_level(logging.WARNING, logger="kv_transfer.backends.nccl.link")
    # Link.look needs only its clock; a real Link needs a GPU and a communicator
    link = SimpleNamespace(looked_at=time.monotonic())
    Link.look(link, 3)  # just looked: nothing to say
    link.looked_at -= 2 * SLOW_POST_S
    Link.look(link, 0)  # away, but nothing was pending
    link.looked_at -= 2 * SLOW_POST_S
    Link.look(link, 3)
    assert [r.getMessage().split(" after ")[0] for r in caplog.records] == [
        "the link's thread looked at its 3 pending events"]
