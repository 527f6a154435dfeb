"""The tcp backend on real sockets: hostile bytes on the port, one persistent connection
per receiver, reconnecting after a receiver restarts, and the early-frame grace period."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from engine.errors import InvalidRequestError, KVTransferError
from engine.kv_layout import KVLayout, KVMemory
from kv_transfer import ConnectorConfig, KVTargetSpec, make_receiver, make_sender, pack_layer
from kv_transfer.aio import parse_address
from kv_transfer.backends.tcp import TcpReceiver, TcpSender
from kv_transfer.wire import HEADER_SIZE, FrameHeader, FrameKind

pytestmark = pytest.mark.timeout(60)

LAYOUT = make_layout()


def receiver_over(layout: KVLayout = LAYOUT, seed: int = 100, num_blocks: int = 4,
                  **config: object) -> tuple[TcpReceiver, list[torch.Tensor]]:
    dst = random_caches(layout, num_blocks, seed=seed)
    return TcpReceiver(KVMemory(layout, tuple(dst)), ConnectorConfig(**config)), dst  # type: ignore[arg-type]


def sender_over(layout: KVLayout = LAYOUT, seed: int = 200, num_blocks: int = 4,
                **config: object) -> tuple[TcpSender, list[torch.Tensor]]:
    src = random_caches(layout, num_blocks, seed=seed)
    return TcpSender(KVMemory(layout, tuple(src)), ConnectorConfig(**config)), src  # type: ignore[arg-type]


def transfer(sender: TcpSender, receiver: TcpReceiver, tid: str, timeout: float = 10.0) -> None:
    """One whole transfer, checked byte for byte."""
    layout = receiver.memory.layout
    src, dst = sender.memory.layers, receiver.memory.layers
    for kv in dst:  # scribble over the target blocks so that a landing shows
        kv[:, [3, 1]] = 0
    pending = receiver.expect(tid, [3, 1])
    spec = KVTargetSpec("tcp", receiver.address, tid, (3, 1), layout.fingerprint)
    handle = sender.begin(spec)
    for layer in range(layout.num_layers):
        handle.layer_written(layer, [0, 2], None)
    handle.wait(timeout)
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
    (receiver, _), (sender, _) = receiver_over(), sender_over()
    closing.extend([receiver, sender])
    transfer(sender, receiver, "before")
    bad = raw_connection(receiver.address)
    bad.sendall(garbage)
    if garbage.startswith(b"PDKV") and len(garbage) > HEADER_SIZE:
        bad.shutdown(socket.SHUT_WR)  # a frame cut short: the receiver sees EOF mid-payload
    assert dropped(bad)
    bad.close()
    transfer(sender, receiver, "after")


def test_a_data_frame_for_an_unknown_id_writes_nothing(closing: list) -> None:
    receiver, dst = receiver_over(early_grace_s=0.2)
    closing.append(receiver)
    layout = LAYOUT
    before = [kv.clone() for kv in dst]
    pending = receiver.expect("known", [0])
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
    receiver, dst = receiver_over(seed=50)
    closing.append(receiver)
    layout = LAYOUT
    before = [kv.clone() for kv in dst]
    big = receiver.expect("big", [0])
    small = receiver.expect("small", [1])
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
    (receiver, _), (sender, _) = receiver_over(early_grace_s=0.3), sender_over()
    closing.extend([receiver, sender])
    layout = LAYOUT
    spec = KVTargetSpec("tcp", receiver.address, "nobody", (0,), layout.fingerprint)
    handle = sender.begin(spec)
    for layer in range(layout.num_layers):
        handle.layer_written(layer, [0], None)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="no receiver expected it"):
        handle.wait(10)
    assert time.monotonic() - t0 < 3
    # expect() after the grace period fails at once instead of waiting for lost frames.
    late = receiver.expect("nobody", [1])
    with pytest.raises(KVTransferError):
        late.wait(0.5)


def test_many_transfers_share_one_connection(closing: list) -> None:
    layout = make_layout(num_layers=2)
    (receiver, _), (sender, _) = receiver_over(layout), sender_over(layout)
    closing.extend([receiver, sender])
    for i in range(8):
        transfer(sender, receiver, f"t{i}")
    assert len(receiver._conns) == 1


def test_the_sender_reconnects_after_the_receiver_restarts(closing: list) -> None:
    sender, _ = sender_over()
    closing.append(sender)
    first, _ = receiver_over()
    transfer(sender, first, "one")
    host, port = parse_address(first.address)
    first.close()
    second, _ = receiver_over(host=host, port=port)  # same address, a new process in real life
    closing.append(second)
    deadline = time.monotonic() + 5
    while True:  # the first attempt may race the old connection's teardown
        try:
            transfer(sender, second, f"two-{time.monotonic()}", timeout=2)
            break
        except KVTransferError:
            assert time.monotonic() < deadline
    transfer(sender, second, "three")


def test_closing_the_sender_fails_its_unfinished_transfers(closing: list) -> None:
    (receiver, _), (sender, _) = receiver_over(seed=40), sender_over()
    closing.append(receiver)
    layout = LAYOUT
    pending = receiver.expect("r", [0])
    handle = sender.begin(KVTargetSpec("tcp", receiver.address, "r", (0,), layout.fingerprint))
    handle.layer_written(0, [1], None)
    sender.close()
    with pytest.raises(KVTransferError):
        handle.wait(5)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="sender closed"):
        pending.wait(5)  # told by an abort frame on the way out
    assert time.monotonic() - t0 < 1
    with pytest.raises(KVTransferError):
        sender.begin(KVTargetSpec("tcp", receiver.address, "s", (0,), layout.fingerprint))


def test_a_wildcard_bind_advertises_a_dialable_address(closing: list) -> None:
    (receiver, _), (sender, _) = receiver_over(host="0.0.0.0"), sender_over()
    closing.extend([receiver, sender])
    host, _ = parse_address(receiver.address)
    assert host not in ("0.0.0.0", "")
    transfer(sender, receiver, "wild")
    named, _ = receiver_over(host="0.0.0.0", advertise_host="kv.example")
    closing.append(named)
    assert named.address.startswith("kv.example:")


def test_close_is_idempotent_and_frees_the_port() -> None:
    receiver, _ = receiver_over()
    host, port = parse_address(receiver.address)
    receiver.close()
    receiver.close()
    again, _ = receiver_over(host=host, port=port)
    again.close()


def test_factories_pick_the_backend_and_refuse_unknown_ones() -> None:
    memory = KVMemory(LAYOUT, tuple(random_caches(LAYOUT, 2, seed=1)))
    receiver = make_receiver("tcp", memory, ConnectorConfig(port=0))
    assert isinstance(receiver, TcpReceiver) and parse_address(receiver.address)[1] > 0
    receiver.close()
    for bad in (lambda: make_receiver("carrier-pigeon", memory),
                lambda: make_sender("local", memory)):
        with pytest.raises(InvalidRequestError, match="unknown KV connector"):
            bad()
    with pytest.raises(ValueError):
        parse_address("no-port")


def test_with_a_token_only_senders_that_prove_it_are_admitted(closing: list) -> None:
    receiver, _ = receiver_over(token="kv-secret", connect_timeout_s=1.0)
    good, _ = sender_over(token="kv-secret")
    wrong, _ = sender_over(token="kv-guess", connect_timeout_s=1.0)
    none, _ = sender_over(connect_timeout_s=1.0)
    closing.extend([receiver, good, wrong, none])
    transfer(good, receiver, "proved")
    for stranger, tid in ((wrong, "wrong"), (none, "none")):
        with pytest.raises(KVTransferError):
            transfer(stranger, receiver, tid, timeout=5.0)
        receiver.cancel(tid)
    transfer(good, receiver, "still")  # the refusals cost the admitted sender nothing


def test_a_sender_with_a_token_refuses_a_receiver_that_sends_no_challenge(closing: list
                                                                          ) -> None:
    (receiver, _), (sender, _) = receiver_over(), sender_over(token="kv-secret",
                                                              connect_timeout_s=0.5)
    closing.extend([receiver, sender])
    with pytest.raises(KVTransferError, match="challenge"):
        transfer(sender, receiver, "unchallenged", timeout=5.0)
    receiver.cancel("unchallenged")
