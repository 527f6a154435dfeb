"""Behaviour every connector backend shares (every name in the registry): bytes land
exactly in the receiver's reserved blocks, and every failure is a prompt KVTransferError,
never a hang or a write into blocks the receiver gave up.

The suite is parametrised by the registry, so a new backend -- built in, or a plugin named
in PDSERVE_KV_BACKENDS -- runs it with no edit here (tests/kv_transfer/test_registry.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import torch
from kvt_helpers import backend_params, make_layout, random_caches

from engine.errors import KVTransferError, LayoutMismatchError
from engine.kv_layout import KVLayout, KVMemory
from kv_transfer import KVReceiver, KVTargetSpec, SendHandle, introduce, make_receiver

pytestmark = pytest.mark.timeout(60)

BACKENDS = backend_params("cpu")
Ends = Callable[..., tuple]


def target_of(kind: str, receiver: KVReceiver, tid: str, block_ids: Sequence[int],
              layout: KVLayout) -> KVTargetSpec:
    return KVTargetSpec(connector=kind, address=receiver.address, transfer_id=tid,
                        block_ids=tuple(block_ids), layout_fingerprint=layout.fingerprint)


def send_layers(handle: SendHandle, src: list[torch.Tensor], ids: Sequence[int],
                layers: Sequence[int] | None = None) -> None:
    for layer in range(len(src)) if layers is None else layers:
        handle.layer_written(layer, ids, None)


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
def test_every_layer_lands_exactly_in_the_reserved_blocks(connector_ends: Ends, kind: str,
                                                          dtype: str) -> None:
    layout = make_layout(dtype, num_layers=5)
    src = random_caches(layout, 16, seed=1)
    dst = random_caches(layout, 20, seed=2)
    before = [kv.clone() for kv in dst]
    receiver, sender = connector_ends(kind, layout, src, dst)
    src_ids, dst_ids = [3, 0, 9, 15, 4], [19, 2, 7, 11, 0]
    pending = receiver.expect("req-a", dst_ids)
    handle = sender.begin(target_of(kind, receiver, "req-a", dst_ids, layout))
    send_layers(handle, src, src_ids)
    sent = handle.wait(10)
    got = pending.wait(10)
    assert landed(dst, dst_ids, src, src_ids)
    others = [b for b in range(20) if b not in dst_ids]
    assert all(torch.equal(d[:, others], b[:, others]) for d, b in zip(dst, before, strict=True))
    expected_bytes = layout.num_layers * layout.packed_layer_bytes(len(src_ids))
    assert sent.bytes == got.bytes == expected_bytes
    assert sent.seconds > 0 and got.seconds > 0
    assert pending.done() and pending.finished()
    wait_until(handle.finished)  # the sender no longer reads its blocks


@pytest.mark.parametrize("kind", BACKENDS)
def test_waits_are_awaitable_without_a_thread_per_transfer(connector_ends: Ends,
                                                           kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 8, seed=31), random_caches(layout, 8, seed=32)
    receiver, sender = connector_ends(kind, layout, src, dst)

    async def main() -> list:
        jobs = []
        for r in range(4):
            tid = f"a{r}"
            pending = receiver.expect(tid, [2 * r, 2 * r + 1])
            handle = sender.begin(target_of(kind, receiver, tid, [2 * r, 2 * r + 1], layout))
            send_layers(handle, src, [r, r + 4])
            jobs += [handle.wait_async(10), pending.wait_async(10)]
        stats = await asyncio.gather(*jobs)
        # Nothing was handed to this loop's thread pool (to_thread would create it).
        assert getattr(asyncio.get_running_loop(), "_default_executor", None) is None
        return stats

    stats = asyncio.run(main())
    assert all(s.bytes == layout.num_layers * layout.packed_layer_bytes(2) for s in stats)
    for r in range(4):
        assert landed(dst, [2 * r, 2 * r + 1], src, [r, r + 4])


@pytest.mark.parametrize("kind", BACKENDS)
def test_layers_may_arrive_in_any_order(connector_ends: Ends, kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=3), random_caches(layout, 4, seed=4)
    receiver, sender = connector_ends(kind, layout, src, dst)
    pending = receiver.expect("r", [1, 2])
    handle = sender.begin(target_of(kind, receiver, "r", [1, 2], layout))
    send_layers(handle, src, [3, 0], layers=[3, 1, 0, 2])
    handle.wait(10)
    pending.wait(10)
    assert landed(dst, [1, 2], src, [3, 0])


@pytest.mark.parametrize("kind", BACKENDS)
def test_frames_with_another_fingerprint_are_rejected_on_both_sides(connector_ends: Ends,
                                                                    kind: str) -> None:
    mine, theirs = make_layout(), make_layout(model_id="another-model")
    dst = random_caches(mine, 6, seed=5)
    before = [kv.clone() for kv in dst]
    receiver, sender = connector_ends(kind, mine, random_caches(theirs, 4, seed=6), dst,
                                      sender_layout=theirs)
    pending = receiver.expect("r", [1, 2])
    # A target that (wrongly) names the sender's fingerprint: the frames carry it and the
    # receiver is the one that notices.
    handle = sender.begin(target_of(kind, receiver, "r", [1, 2], theirs))
    send_layers(handle, dst, [0, 1])
    with pytest.raises(LayoutMismatchError):
        handle.wait(10)
    with pytest.raises(LayoutMismatchError):
        pending.wait(10)
    assert untouched(dst, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_begin_refuses_a_target_of_another_layout_and_tells_the_receiver(
        connector_ends: Ends, kind: str) -> None:
    mine, theirs = make_layout(), make_layout(model_id="another-model")
    dst = random_caches(mine, 6, seed=7)
    before = [kv.clone() for kv in dst]
    receiver, sender = connector_ends(kind, mine, random_caches(theirs, 4, seed=6), dst,
                                      sender_layout=theirs)
    pending = receiver.expect("r", [1, 2])
    with pytest.raises(LayoutMismatchError):
        sender.begin(target_of(kind, receiver, "r", [1, 2], mine))
    t0 = time.monotonic()
    with pytest.raises(LayoutMismatchError):
        pending.wait(10)
    assert time.monotonic() - t0 < 5
    assert untouched(dst, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_wait_times_out_fast_when_no_sender_comes_and_later_frames_are_dropped(
        connector_ends: Ends, kind: str) -> None:
    layout = make_layout()
    dst = random_caches(layout, 6, seed=8)
    before = [kv.clone() for kv in dst]
    receiver, sender = connector_ends(kind, layout, random_caches(layout, 2, seed=9), dst)
    pending = receiver.expect("late", [4, 5])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="not complete"):
        pending.wait(0.2)
    assert time.monotonic() - t0 < 1.0
    handle = sender.begin(target_of(kind, receiver, "late", [4, 5], layout))
    send_layers(handle, dst, [0, 1])
    with pytest.raises(KVTransferError, match="cancelled"):
        handle.wait(10)
    assert untouched(dst, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_sender_to_a_dead_address_fails_within_its_timeout(connector_ends: Ends,
                                                             kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 2, seed=10), random_caches(layout, 2, seed=10)
    # An address that worked a moment ago: its receiver is gone now.
    gone = make_receiver(kind, KVMemory(layout, tuple(dst)))
    address = gone.address
    _, sender = connector_ends(kind, layout, src, dst)
    introduce(gone, sender)
    gone.close()
    spec = KVTargetSpec(kind, address, "r", (0, 1), layout.fingerprint)
    handle = sender.begin(spec)
    send_layers(handle, src, [0, 1])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        handle.wait(2.0)
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("kind", BACKENDS)
def test_closing_the_receiver_mid_transfer_fails_both_sides(connector_ends: Ends,
                                                            kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=11), random_caches(layout, 4, seed=12)
    receiver, sender = connector_ends(kind, layout, src, dst)
    pending = receiver.expect("r", [0, 3])
    handle = sender.begin(target_of(kind, receiver, "r", [0, 3], layout))
    send_layers(handle, src, [1, 2], layers=[0, 1])
    wait_until(lambda: landed(dst, [0, 3], src, [1, 2], layers=[0, 1]))
    receiver.close()
    send_layers(handle, src, [1, 2], layers=[2, 3])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        handle.wait(10)
    assert time.monotonic() - t0 < 5
    with pytest.raises(KVTransferError, match="closed"):
        pending.wait(1)


@pytest.mark.parametrize("kind", BACKENDS)
def test_cancel_drops_every_later_frame(connector_ends: Ends, kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=13), random_caches(layout, 4, seed=14)
    receiver, sender = connector_ends(kind, layout, src, dst)
    pending = receiver.expect("r", [2, 1])
    handle = sender.begin(target_of(kind, receiver, "r", [2, 1], layout))
    send_layers(handle, src, [0, 3], layers=[0])
    wait_until(lambda: landed(dst, [2, 1], src, [0, 3], layers=[0]))
    after_first = [kv.clone() for kv in dst]
    pending.cancel()  # what the engine does on abort: once finished, nothing more is written
    wait_until(pending.finished)
    with pytest.raises(KVTransferError, match="cancelled"):
        pending.wait(1)
    send_layers(handle, src, [0, 3], layers=[1, 2, 3])
    with pytest.raises(KVTransferError, match="cancelled"):
        handle.wait(10)
    assert untouched(dst, after_first)


@pytest.mark.parametrize("kind", BACKENDS)
def test_sixteen_interleaved_transfers_each_land_in_their_own_blocks(connector_ends: Ends,
                                                                     kind: str) -> None:
    layout = make_layout(num_layers=6)
    src = random_caches(layout, 64, seed=15)
    dst = random_caches(layout, 160, seed=16)
    receiver, sender = connector_ends(kind, layout, src, dst)
    jobs = []
    free = list(range(160))[::-1]
    for r in range(16):
        n = 1 + r % 5
        src_ids = [(7 * r + 3 * i) % 64 for i in range(n)]
        dst_ids = [free.pop() for _ in range(n)][::-1]
        tid = f"req-{r}"
        pending = receiver.expect(tid, dst_ids)
        handle = sender.begin(target_of(kind, receiver, tid, dst_ids, layout))
        jobs.append((handle, pending, src_ids, dst_ids))

    def send_half(part: int) -> None:  # two prefill threads, layer-major like a forward pass
        for layer in range(layout.num_layers):
            for handle, _, src_ids, _ in jobs[part::2]:
                handle.layer_written(layer, src_ids, None)

    threads = [threading.Thread(target=send_half, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for handle, pending, src_ids, dst_ids in jobs:
        assert handle.wait(10).bytes == layout.num_layers * layout.packed_layer_bytes(
            len(src_ids))
        pending.wait(10)
        assert landed(dst, dst_ids, src, src_ids)


@pytest.mark.parametrize("kind", BACKENDS)
def test_abort_fails_the_receivers_wait_promptly(connector_ends: Ends, kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=17), random_caches(layout, 4, seed=18)
    receiver, sender = connector_ends(kind, layout, src, dst)
    pending = receiver.expect("r", [0])
    handle = sender.begin(target_of(kind, receiver, "r", [0], layout))
    send_layers(handle, src, [1], layers=[0])
    handle.cancel()
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="aborted"):
        pending.wait(5)
    assert time.monotonic() - t0 < 1
    with pytest.raises(KVTransferError, match="aborted"):
        handle.wait(1)
    wait_until(handle.finished)


@pytest.mark.parametrize("kind", BACKENDS)
def test_frames_that_come_before_expect_are_kept_for_it(connector_ends: Ends,
                                                        kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=19), random_caches(layout, 4, seed=20)
    receiver, sender = connector_ends(kind, layout, src, dst)
    handle = sender.begin(target_of(kind, receiver, "early", [3, 2], layout))
    send_layers(handle, src, [0, 1])
    time.sleep(0.2)  # let the frames reach the receiver before expect()
    pending = receiver.expect("early", [3, 2])
    handle.wait(10)
    pending.wait(10)
    assert landed(dst, [3, 2], src, [0, 1])


@pytest.mark.parametrize("kind", BACKENDS)
def test_caller_mistakes_are_value_errors_and_an_incomplete_finish_fails(
        connector_ends: Ends, kind: str) -> None:
    layout = make_layout()
    src, dst = random_caches(layout, 4, seed=21), random_caches(layout, 4, seed=22)
    with pytest.raises(ValueError):
        KVMemory(layout, tuple(dst[:2]))  # caches of too few layers cannot be registered
    receiver, sender = connector_ends(kind, layout, src, dst)
    pending = receiver.expect("r", [0, 1])
    with pytest.raises(ValueError):
        receiver.expect("r", [2, 3])  # same id twice
    with pytest.raises(ValueError):
        receiver.expect("s", [3, 3])  # repeated block
    with pytest.raises(ValueError):
        receiver.expect("s", [2, 4])  # no such block
    handle = sender.begin(target_of(kind, receiver, "r", [0, 1], layout))
    with pytest.raises(ValueError):
        handle.layer_written(0, [0, 1, 2], None)  # wrong block count
    with pytest.raises(ValueError):
        handle.layer_written(9, [0, 1], None)  # no such layer
    handle.layer_written(0, [0, 1], None)
    with pytest.raises(ValueError):
        handle.layer_written(0, [0, 1], None)  # twice
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="1 of 4 layers"):
        handle.wait(5)
    with pytest.raises(KVTransferError, match="1 of 4 layers"):
        pending.wait(5)  # the receiver is told, not left to time out
    assert time.monotonic() - t0 < 1
