"""Behaviour every connector backend shares (``local`` and ``tcp``): bytes land exactly in
the receiver's reserved blocks, and every failure is a prompt KVTransferError, never a
hang or a write into blocks the receiver gave up."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVLayout
from kv_transfer import KVReceiver, KVTargetSpec, SendHandle, pack_layer

pytestmark = pytest.mark.timeout(60)

BACKENDS = ["local", "tcp"]
Pair = Callable[[str], tuple]


def target_of(kind: str, receiver: KVReceiver, tid: str, block_ids: Sequence[int],
              layout: KVLayout) -> KVTargetSpec:
    return KVTargetSpec(connector=kind, address=receiver.address, transfer_id=tid,
                        block_ids=tuple(block_ids), layout_fingerprint=layout.fingerprint)


def send_layers(handle: SendHandle, src: list[torch.Tensor], ids: Sequence[int],
                layers: Sequence[int] | None = None) -> None:
    for layer in range(len(src)) if layers is None else layers:
        handle.send_layer(layer, pack_layer(src[layer], ids))


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def landed(dst: list[torch.Tensor], dst_ids: Sequence[int], src: list[torch.Tensor],
           src_ids: Sequence[int], layers: Sequence[int] | None = None) -> bool:
    return all(torch.equal(dst[i][:, list(dst_ids)], src[i][:, list(src_ids)])
               for i in (range(len(src)) if layers is None else layers))


def untouched(dst: list[torch.Tensor], before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(dst, before, strict=True))


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_layer_lands_exactly_in_the_reserved_blocks(connector_pair: Pair, kind: str,
                                                          dtype: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout(dtype, num_layers=5)
    src = random_caches(layout, 16, seed=1)
    dst = random_caches(layout, 20, seed=2)
    before = [kv.clone() for kv in dst]
    src_ids, dst_ids = [3, 0, 9, 15, 4], [19, 2, 7, 11, 0]
    pending = receiver.expect("req-a", dst, dst_ids, layout)
    handle = sender.begin(target_of(kind, receiver, "req-a", dst_ids, layout), layout)
    send_layers(handle, src, src_ids)
    sent = handle.finish(10)
    got = pending.wait(10)
    assert landed(dst, dst_ids, src, src_ids)
    others = [b for b in range(20) if b not in dst_ids]
    assert all(torch.equal(d[:, others], b[:, others]) for d, b in zip(dst, before, strict=True))
    expected_bytes = layout.num_layers * layout.packed_layer_bytes(len(src_ids))
    assert sent.bytes == got.bytes == expected_bytes
    assert sent.seconds > 0 and got.seconds > 0
    assert pending.done()


@pytest.mark.parametrize("kind", BACKENDS)
def test_layers_may_arrive_in_any_order(connector_pair: Pair, kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=3), random_caches(layout, 4, seed=4)
    pending = receiver.expect("r", dst, [1, 2], layout)
    handle = sender.begin(target_of(kind, receiver, "r", [1, 2], layout), layout)
    send_layers(handle, src, [3, 0], layers=[3, 1, 0, 2])
    handle.finish(10)
    pending.wait(10)
    assert landed(dst, [1, 2], src, [3, 0])


@pytest.mark.parametrize("kind", BACKENDS)
def test_frames_with_another_fingerprint_are_rejected_on_both_sides(connector_pair: Pair,
                                                                    kind: str) -> None:
    receiver, sender = connector_pair(kind)
    mine, theirs = make_layout(), make_layout(model_id="another-model")
    dst = random_caches(mine, 6, seed=5)
    before = [kv.clone() for kv in dst]
    pending = receiver.expect("r", dst, [1, 2], mine)
    # A target that (wrongly) names the sender's fingerprint: the frames carry it and the
    # receiver is the one that notices.
    handle = sender.begin(target_of(kind, receiver, "r", [1, 2], theirs), theirs)
    send_layers(handle, random_caches(theirs, 4, seed=6), [0, 1])
    with pytest.raises(LayoutMismatchError):
        handle.finish(10)
    with pytest.raises(LayoutMismatchError):
        pending.wait(10)
    assert untouched(dst, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_begin_refuses_a_target_of_another_layout_and_tells_the_receiver(
        connector_pair: Pair, kind: str) -> None:
    receiver, sender = connector_pair(kind)
    mine, theirs = make_layout(), make_layout(model_id="another-model")
    dst = random_caches(mine, 6, seed=7)
    before = [kv.clone() for kv in dst]
    pending = receiver.expect("r", dst, [1, 2], mine)
    with pytest.raises(LayoutMismatchError):
        sender.begin(target_of(kind, receiver, "r", [1, 2], mine), theirs)
    t0 = time.monotonic()
    with pytest.raises(LayoutMismatchError):
        pending.wait(10)
    assert time.monotonic() - t0 < 5
    assert untouched(dst, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_wait_times_out_fast_when_no_sender_comes_and_later_frames_are_dropped(
        connector_pair: Pair, kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    dst = random_caches(layout, 6, seed=8)
    before = [kv.clone() for kv in dst]
    pending = receiver.expect("late", dst, [4, 5], layout)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="not complete"):
        pending.wait(0.2)
    assert time.monotonic() - t0 < 1.0
    handle = sender.begin(target_of(kind, receiver, "late", [4, 5], layout), layout)
    send_layers(handle, random_caches(layout, 2, seed=9), [0, 1])
    with pytest.raises(KVTransferError, match="cancelled"):
        handle.finish(10)
    assert untouched(dst, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_sender_to_a_dead_address_fails_within_its_timeout(connector_pair: Pair,
                                                             kind: str) -> None:
    _, sender = connector_pair(kind)
    if kind == "tcp":
        with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
            probe.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{probe.getsockname()[1]}"
    else:
        address = "local:12345"
    layout = make_layout()
    spec = KVTargetSpec(kind, address, "r", (0, 1), layout.fingerprint)
    handle = sender.begin(spec, layout)
    send_layers(handle, random_caches(layout, 2, seed=10), [0, 1])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        handle.finish(2.0)
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("kind", BACKENDS)
def test_closing_the_receiver_mid_transfer_fails_both_sides(connector_pair: Pair,
                                                            kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=11), random_caches(layout, 4, seed=12)
    pending = receiver.expect("r", dst, [0, 3], layout)
    handle = sender.begin(target_of(kind, receiver, "r", [0, 3], layout), layout)
    send_layers(handle, src, [1, 2], layers=[0, 1])
    wait_until(lambda: landed(dst, [0, 3], src, [1, 2], layers=[0, 1]))
    receiver.close()
    send_layers(handle, src, [1, 2], layers=[2, 3])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        handle.finish(10)
    assert time.monotonic() - t0 < 5
    with pytest.raises(KVTransferError, match="closed"):
        pending.wait(1)


@pytest.mark.parametrize("kind", BACKENDS)
def test_cancel_drops_every_later_frame(connector_pair: Pair, kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=13), random_caches(layout, 4, seed=14)
    pending = receiver.expect("r", dst, [2, 1], layout)
    handle = sender.begin(target_of(kind, receiver, "r", [2, 1], layout), layout)
    send_layers(handle, src, [0, 3], layers=[0])
    wait_until(lambda: landed(dst, [2, 1], src, [0, 3], layers=[0]))
    after_first = [kv.clone() for kv in dst]
    receiver.cancel("r")
    with pytest.raises(KVTransferError, match="cancelled"):
        pending.wait(1)
    send_layers(handle, src, [0, 3], layers=[1, 2, 3])
    with pytest.raises(KVTransferError, match="cancelled"):
        handle.finish(10)
    assert untouched(dst, after_first)


@pytest.mark.parametrize("kind", BACKENDS)
def test_sixteen_interleaved_transfers_each_land_in_their_own_blocks(connector_pair: Pair,
                                                                     kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout(num_layers=6)
    src = random_caches(layout, 64, seed=15)
    dst = random_caches(layout, 160, seed=16)
    jobs = []
    free = list(range(160))[::-1]
    for r in range(16):
        n = 1 + r % 5
        src_ids = [(7 * r + 3 * i) % 64 for i in range(n)]
        dst_ids = [free.pop() for _ in range(n)][::-1]
        tid = f"req-{r}"
        pending = receiver.expect(tid, dst, dst_ids, layout)
        handle = sender.begin(target_of(kind, receiver, tid, dst_ids, layout), layout)
        jobs.append((handle, pending, src_ids, dst_ids))

    def send_half(part: int) -> None:  # two prefill threads, layer-major like a forward pass
        for layer in range(layout.num_layers):
            for handle, _, src_ids, _ in jobs[part::2]:
                handle.send_layer(layer, pack_layer(src[layer], src_ids))

    threads = [threading.Thread(target=send_half, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for handle, pending, src_ids, dst_ids in jobs:
        assert handle.finish(10).bytes == layout.num_layers * layout.packed_layer_bytes(
            len(src_ids))
        pending.wait(10)
        assert landed(dst, dst_ids, src, src_ids)


@pytest.mark.parametrize("kind", BACKENDS)
def test_abort_fails_the_receivers_wait_promptly(connector_pair: Pair, kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=17), random_caches(layout, 4, seed=18)
    pending = receiver.expect("r", dst, [0], layout)
    handle = sender.begin(target_of(kind, receiver, "r", [0], layout), layout)
    send_layers(handle, src, [1], layers=[0])
    handle.abort()
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="aborted"):
        pending.wait(5)
    assert time.monotonic() - t0 < 1
    with pytest.raises(KVTransferError, match="aborted"):
        handle.finish(1)


@pytest.mark.parametrize("kind", BACKENDS)
def test_frames_that_come_before_expect_are_kept_for_it(connector_pair: Pair,
                                                        kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=19), random_caches(layout, 4, seed=20)
    handle = sender.begin(target_of(kind, receiver, "early", [3, 2], layout), layout)
    send_layers(handle, src, [0, 1])
    time.sleep(0.2)  # let the tcp frames reach the receiver before expect()
    pending = receiver.expect("early", dst, [3, 2], layout)
    handle.finish(10)
    pending.wait(10)
    assert landed(dst, [3, 2], src, [0, 1])


@pytest.mark.parametrize("kind", BACKENDS)
def test_caller_mistakes_are_value_errors_and_an_incomplete_finish_fails(
        connector_pair: Pair, kind: str) -> None:
    receiver, sender = connector_pair(kind)
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=21), random_caches(layout, 4, seed=22)
    pending = receiver.expect("r", dst, [0, 1], layout)
    with pytest.raises(ValueError):
        receiver.expect("r", dst, [2, 3], layout)  # same id twice
    with pytest.raises(ValueError):
        receiver.expect("s", dst[:2], [2, 3], layout)  # caches of too few layers
    with pytest.raises(ValueError):
        receiver.expect("s", dst, [3, 3], layout)  # repeated block
    handle = sender.begin(target_of(kind, receiver, "r", [0, 1], layout), layout)
    with pytest.raises(ValueError):
        handle.send_layer(0, pack_layer(src[0], [0, 1, 2]))  # wrong block count
    with pytest.raises(ValueError):
        handle.send_layer(9, pack_layer(src[0], [0, 1]))  # no such layer
    handle.send_layer(0, pack_layer(src[0], [0, 1]))
    with pytest.raises(ValueError):
        handle.send_layer(0, pack_layer(src[0], [0, 1]))  # twice
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="1 of 4 layers"):
        handle.finish(5)
    with pytest.raises(KVTransferError, match="1 of 4 layers"):
        pending.wait(5)  # the receiver is told, not left to time out
    assert time.monotonic() - t0 < 1
