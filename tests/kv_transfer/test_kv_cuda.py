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
