"""Device caches through every connector (skipped without CUDA): GPU caches on both
sides, and a CPU sender into GPU blocks; the bytes land exactly as on the CPU."""

from __future__ import annotations

import pytest
import torch
from kvt_helpers import backend_params, make_layout, random_caches

from engine.kv_layout import KVMemory
from kv_transfer import KVTargetSpec, introduce, make_receiver, make_sender

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# Two ranks of one NCCL communicator must be on two GPUs: the receiver takes the last one.
DST = f"cuda:{max(torch.cuda.device_count() - 1, 0)}"


@pytest.mark.parametrize("kind", backend_params("cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("src_device", ["cuda:0", "cpu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_device_caches_receive_exactly(kind: str, src_device: str, dtype: str) -> None:
    if kind == "nccl" and (src_device == "cpu" or DST == "cuda:0"):
        pytest.skip("nccl moves GPU memory between two GPUs")
    layout = make_layout(dtype, num_layers=3)
    src = [kv.to(src_device) for kv in random_caches(layout, 8, seed=1)]
    dst = [kv.to(DST) for kv in random_caches(layout, 12, seed=2)]
    before = [kv.clone() for kv in dst]
    receiver = make_receiver(kind, KVMemory(layout, tuple(dst)))
    sender = make_sender(kind, KVMemory(layout, tuple(src)))
    try:
        introduce(receiver, sender)
        src_ids, dst_ids = [5, 0, 7], [11, 3, 6]
        pending = receiver.expect("gpu", dst_ids)
        spec = KVTargetSpec(kind, receiver.address, "gpu", tuple(dst_ids), layout.fingerprint)
        handle = sender.begin(spec)
        for layer in range(layout.num_layers):
            ready = None
            if src_device != "cpu":
                ready = torch.cuda.Event()
                ready.record()
            handle.layer_written(layer, src_ids, ready)
        handle.wait(30)
        pending.wait(30)
    finally:
        sender.close()
        receiver.close()
    others = [b for b in range(12) if b not in dst_ids]
    for s, d, b in zip(src, dst, before, strict=True):
        assert d.device.type == "cuda"
        assert torch.equal(d[:, dst_ids].cpu(), s[:, src_ids].cpu())
        assert torch.equal(d[:, others], b[:, others])


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2 if torch.cuda.is_available()
                              else True, reason="nccl needs two GPUs")


def _nccl_pair(layout, src_blocks: int, dst_blocks: int, timeout_s: float = 5.0):
    from kv_transfer import ConnectorConfig

    src = [kv.to("cuda:0") for kv in random_caches(layout, src_blocks, seed=3)]
    dst = [kv.to(DST) for kv in random_caches(layout, dst_blocks, seed=4)]
    config = ConnectorConfig(connect_timeout_s=timeout_s)
    receiver = make_receiver("nccl", KVMemory(layout, tuple(dst)), config)
    sender = make_sender("nccl", KVMemory(layout, tuple(src)), config)
    introduce(receiver, sender)
    return src, dst, sender, receiver


def _send(sender, receiver, layout, tid: str, src_ids, dst_ids):
    pending = receiver.expect(tid, dst_ids)
    handle = sender.begin(KVTargetSpec("nccl", receiver.address, tid, tuple(dst_ids),
                                       layout.fingerprint))
    for layer in range(layout.num_layers):
        ready = torch.cuda.Event()
        ready.record()
        handle.layer_written(layer, src_ids, ready)
    return pending, handle


@two_gpus
def test_nccl_link_idle_past_its_timeout_still_carries_a_transfer() -> None:
    """The link connects at the handshake; a first transfer long after it still lands
    (the receive of the first header used to time out while nothing came)."""
    layout = make_layout("bfloat16", num_layers=2)
    src, dst, sender, receiver = _nccl_pair(layout, 8, 8)
    try:
        import time
        time.sleep(6.5)  # past the 5 s link timeout
        pending, handle = _send(sender, receiver, layout, "late", [1, 2], [4, 5])
        handle.wait(30)
        pending.wait(30)
    finally:
        sender.close()
        receiver.close()
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, [4, 5]].cpu(), s[:, [1, 2]].cpu())


@two_gpus
@pytest.mark.parametrize("src_ids,dst_ids", [
    ([2, 3, 4, 5], [8, 9, 10, 11]),  # one run on both sides: no copy
    ([2, 3, 4, 5], [11, 0, 9, 4]),  # straight from the cache, scattered on arrival
    ([7, 1, 12, 0], [8, 9, 10, 11]),  # gathered, received in place
    ([7, 1, 12, 0], [11, 0, 9, 4]),  # gathered and scattered
])
def test_nccl_runs_and_scattered_blocks_land_exactly(src_ids, dst_ids) -> None:
    layout = make_layout("float16", num_layers=3)
    src, dst, sender, receiver = _nccl_pair(layout, 16, 16)
    before = [kv.clone() for kv in dst]
    try:
        pending, handle = _send(sender, receiver, layout, "t", src_ids, dst_ids)
        handle.wait(30)
        pending.wait(30)
    finally:
        sender.close()
        receiver.close()
    others = [b for b in range(16) if b not in dst_ids]
    for s, d, b in zip(src, dst, before, strict=True):
        assert torch.equal(d[:, dst_ids].cpu(), s[:, src_ids].cpu())
        assert torch.equal(d[:, others], b[:, others])


@two_gpus
def test_nccl_interleaved_transfers_and_a_cancelled_one() -> None:
    """Eight transfers queued together (one cancelled by the receiver before it starts)
    share one link: each lands in its own blocks, the cancelled one in none, and its
    pending transfer reports quiet (its blocks may be reused)."""
    layout = make_layout("bfloat16", num_layers=4)
    src, dst, sender, receiver = _nccl_pair(layout, 64, 64)
    before = [kv.clone() for kv in dst]
    try:
        work = []
        for i in range(8):
            src_ids = list(range(8 * i, 8 * i + 4))
            dst_ids = [63 - 8 * i - j for j in range(4)]
            if i == 5:
                pending = receiver.expect(f"t{i}", dst_ids)
                pending.cancel()
                work.append((None, None, src_ids, dst_ids, pending))
                continue
            pending, handle = _send(sender, receiver, layout, f"t{i}", src_ids, dst_ids)
            work.append((pending, handle, src_ids, dst_ids, None))
        for pending, handle, *_ in work:
            if handle is not None:
                handle.wait(30)
                pending.wait(30)
        cancelled = work[5][4]
        import time
        deadline = time.monotonic() + 10
        while not cancelled.finished():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        sender.close()
        receiver.close()
    for i, (_, handle, src_ids, dst_ids, _) in enumerate(work):
        for s, d, b in zip(src, dst, before, strict=True):
            want = b[:, dst_ids] if handle is None else s[:, src_ids]
            assert torch.equal(d[:, dst_ids].cpu(), want.cpu()), i
