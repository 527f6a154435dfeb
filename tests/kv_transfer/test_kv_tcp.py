"""The tcp backend on real sockets: hostile bytes on the port, one persistent connection
per receiver, reconnecting after a receiver restarts, and the early-frame grace period."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from engine.errors import KVTransferError
from engine.kv_layout import KVLayout
from kv_transfer import KVTargetSpec, LocalHub, make_receiver, make_sender, pack_layer
from kv_transfer.local import LocalReceiver
from kv_transfer.tcp import TcpReceiver, TcpSender, parse_address
from kv_transfer.wire import HEADER_SIZE, FrameHeader, FrameKind

pytestmark = pytest.mark.timeout(60)


def transfer(sender: TcpSender, receiver: TcpReceiver, tid: str, layout: KVLayout,
             seed: int, timeout: float = 10.0) -> None:
    """One whole transfer, checked byte for byte."""
    src, dst = random_caches(layout, 4, seed=seed), random_caches(layout, 4, seed=seed + 1)
    pending = receiver.expect(tid, dst, [3, 1], layout)
    spec = KVTargetSpec("tcp", receiver.address, tid, (3, 1), layout.fingerprint)
    handle = sender.begin(spec, layout)
    for layer in range(layout.num_layers):
        handle.send_layer(layer, pack_layer(src[layer], [0, 2]))
    handle.finish(timeout)
    pending.wait(timeout)
    assert all(torch.equal(d[:, [3, 1]], s[:, [0, 2]]) for d, s in zip(dst, src, strict=True))


def raw_connection(address: str) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=5)
    sock.settimeout(5)
    return sock


def dropped(sock: socket.socket) -> bool:
    """True when the receiver closed this connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * HEADER_SIZE,
    bytes(range(256)),
    # A valid header that promises a huge payload, then silence and a close.
    FrameHeader(kind=FrameKind.DATA, transfer_id="x", layer=0, num_layers=1,
                payload_bytes=1 << 30, fingerprint="f", dtype="float32").encode() + b"abc",
    # An ACK is not something a sender may send.
    FrameHeader(kind=FrameKind.ACK, transfer_id="x").encode(),
])
def test_garbage_on_the_port_drops_that_connection_and_others_keep_working(
        closing: list, garbage: bytes) -> None:
    receiver, sender = TcpReceiver(), TcpSender()
    closing.extend([receiver, sender])
    layout = make_layout()
    transfer(sender, receiver, "before", layout, seed=1)
    bad = raw_connection(receiver.address)
    bad.sendall(garbage)
    if garbage.startswith(b"PDKV") and len(garbage) > HEADER_SIZE:
        bad.shutdown(socket.SHUT_WR)  # a frame cut short: the receiver sees EOF mid-payload
    assert dropped(bad)
    bad.close()
    transfer(sender, receiver, "after", layout, seed=3)


def test_a_data_frame_for_an_unknown_id_writes_nothing(closing: list) -> None:
    receiver = TcpReceiver(early_grace_s=0.2)
    closing.append(receiver)
    layout = make_layout()
    dst = random_caches(layout, 4, seed=5)
    before = [kv.clone() for kv in dst]
    pending = receiver.expect("known", dst, [0], layout)
    payload = pack_layer(random_caches(layout, 1, seed=6)[0], [0])
    header = FrameHeader(kind=FrameKind.DATA, transfer_id="stranger", layer=0,
                         num_layers=layout.num_layers, payload_bytes=layout.packed_layer_bytes(1),
                         fingerprint=layout.fingerprint, dtype=layout.dtype)
    sock = raw_connection(receiver.address)
    sock.sendall(header.encode() + payload.numpy().tobytes())
    reply = FrameHeader.decode(sock.recv(HEADER_SIZE, socket.MSG_WAITALL))
    assert reply.kind == FrameKind.ERROR and reply.transfer_id == "stranger"
    sock.close()
    assert not pending.done()
    assert all(torch.equal(a, b) for a, b in zip(dst, before, strict=True))


def data_frame(layout: KVLayout, tid: str, layer: int, payload: bytes) -> bytes:
    return FrameHeader(kind=FrameKind.DATA, transfer_id=tid, layer=layer,
                       num_layers=layout.num_layers, payload_bytes=len(payload),
                       fingerprint=layout.fingerprint, dtype=layout.dtype).encode() + payload


def test_an_oversized_layer_is_read_past_rejected_and_the_stream_stays_in_step(
        closing: list) -> None:
    receiver = TcpReceiver()
    closing.append(receiver)
    layout = make_layout()
    dst = random_caches(layout, 4, seed=50)
    before = [kv.clone() for kv in dst]
    big = receiver.expect("big", dst, [0], layout)
    small = receiver.expect("small", dst, [1], layout)
    src = random_caches(layout, 1, seed=51)
    sock = raw_connection(receiver.address)
    # 8 MiB where one block of 512 bytes is expected: read past, never allocated or written.
    sock.sendall(data_frame(layout, "big", 0, bytes(8 << 20)))
    for layer in range(layout.num_layers):
        sock.sendall(data_frame(layout, "small", layer, pack_layer(src[layer], [0]).view(
            torch.uint8).numpy().tobytes()))
    replies = {}
    for _ in range(2):
        reply = FrameHeader.decode(sock.recv(HEADER_SIZE, socket.MSG_WAITALL))
        if reply.payload_bytes:
            sock.recv(reply.payload_bytes, socket.MSG_WAITALL)  # the reason, not needed here
        replies[reply.transfer_id] = reply.kind
    sock.close()
    assert replies == {"big": FrameKind.ERROR, "small": FrameKind.ACK}
    with pytest.raises(KVTransferError, match="expects"):
        big.wait(5)
    small.wait(5)
    assert all(torch.equal(d[:, 0], b[:, 0]) for d, b in zip(dst, before, strict=True))
    assert all(torch.equal(d[:, 1], s[:, 0]) for d, s in zip(dst, src, strict=True))


def test_frames_nobody_expects_are_refused_after_the_grace_period(closing: list) -> None:
    receiver, sender = TcpReceiver(early_grace_s=0.3), TcpSender()
    closing.extend([receiver, sender])
    layout = make_layout()
    spec = KVTargetSpec("tcp", receiver.address, "nobody", (0,), layout.fingerprint)
    handle = sender.begin(spec, layout)
    src = random_caches(layout, 1, seed=7)
    for layer in range(layout.num_layers):
        handle.send_layer(layer, pack_layer(src[layer], [0]))
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="no receiver expected it"):
        handle.finish(10)
    assert time.monotonic() - t0 < 3
    # expect() after the grace period fails at once instead of waiting for lost frames.
    late = receiver.expect("nobody", random_caches(layout, 2, seed=8), [1], layout)
    with pytest.raises(KVTransferError):
        late.wait(0.5)


def test_many_transfers_share_one_connection(closing: list) -> None:
    receiver, sender = TcpReceiver(), TcpSender()
    closing.extend([receiver, sender])
    layout = make_layout(num_layers=2)
    for i in range(8):
        transfer(sender, receiver, f"t{i}", layout, seed=10 + 2 * i)
    assert len(receiver._conns) == 1


def test_the_sender_reconnects_after_the_receiver_restarts(closing: list) -> None:
    sender = TcpSender()
    closing.append(sender)
    layout = make_layout()
    first = TcpReceiver()
    transfer(sender, first, "one", layout, seed=30)
    host, port = parse_address(first.address)
    first.close()
    second = TcpReceiver(host, port)  # same address, a new process in real life
    closing.append(second)
    deadline = time.monotonic() + 5
    while True:  # the first attempt may race the old connection's teardown
        try:
            transfer(sender, second, f"two-{time.monotonic()}", layout, seed=32, timeout=2)
            break
        except KVTransferError:
            assert time.monotonic() < deadline
    transfer(sender, second, "three", layout, seed=34)


def test_closing_the_sender_fails_its_unfinished_transfers(closing: list) -> None:
    receiver, sender = TcpReceiver(), TcpSender()
    closing.append(receiver)
    layout = make_layout()
    dst = random_caches(layout, 4, seed=40)
    pending = receiver.expect("r", dst, [0], layout)
    handle = sender.begin(KVTargetSpec("tcp", receiver.address, "r", (0,), layout.fingerprint),
                          layout)
    handle.send_layer(0, pack_layer(dst[0], [1]))
    sender.close()
    with pytest.raises(KVTransferError):
        handle.finish(5)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="sender closed"):
        pending.wait(5)  # told by an abort frame on the way out
    assert time.monotonic() - t0 < 1
    with pytest.raises(KVTransferError):
        sender.begin(KVTargetSpec("tcp", receiver.address, "s", (0,), layout.fingerprint),
                     layout)


def test_a_wildcard_bind_advertises_a_dialable_address(closing: list) -> None:
    receiver, sender = TcpReceiver("0.0.0.0"), TcpSender()
    closing.extend([receiver, sender])
    host, _ = parse_address(receiver.address)
    assert host not in ("0.0.0.0", "")
    transfer(sender, receiver, "wild", make_layout(), seed=60)
    named = TcpReceiver("0.0.0.0", advertise_host="kv.example")
    closing.append(named)
    assert named.address.startswith("kv.example:")


def test_close_is_idempotent_and_frees_the_port() -> None:
    receiver = TcpReceiver()
    host, port = parse_address(receiver.address)
    receiver.close()
    receiver.close()
    again = TcpReceiver(host, port)
    again.close()


def test_factories_pick_the_backend_and_refuse_unknown_ones() -> None:
    hub = LocalHub()
    local = make_receiver("local", hub=hub)
    assert isinstance(local, LocalReceiver) and local.address.startswith("local:")
    assert LocalHub().lookup(local.address) is None  # hubs share no state
    local.close()
    receiver = make_receiver("tcp", "127.0.0.1", 0)
    assert isinstance(receiver, TcpReceiver) and parse_address(receiver.address)[1] > 0
    receiver.close()
    for bad in (lambda: make_receiver("carrier-pigeon"), lambda: make_sender("nccl"),
                lambda: make_receiver("local"), lambda: make_sender("local")):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        parse_address("no-port")
