"""Device tensors through both connectors (skipped without CUDA): GPU caches on both
sides, and a CPU sender into GPU blocks; the bytes land exactly as on the CPU."""

from __future__ import annotations

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from kv_transfer import KVTargetSpec, LocalHub, make_receiver, make_sender, pack_layer

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kind", ["local", "tcp"])
@pytest.mark.parametrize("src_device", ["cuda", "cpu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_device_caches_receive_exactly(kind: str, src_device: str, dtype: str) -> None:
    layout = make_layout(dtype, num_layers=3)
    src = [kv.to(src_device) for kv in random_caches(layout, 8, seed=1)]
    dst = [kv.to("cuda") for kv in random_caches(layout, 12, seed=2)]
    before = [kv.clone() for kv in dst]
    hub = LocalHub()
    receiver, sender = make_receiver(kind, hub=hub), make_sender(kind, hub=hub)
    try:
        src_ids, dst_ids = [5, 0, 7], [11, 3, 6]
        pending = receiver.expect("gpu", dst, dst_ids, layout)
        spec = KVTargetSpec(kind, receiver.address, "gpu", tuple(dst_ids), layout.fingerprint)
        handle = sender.begin(spec, layout)
        for layer in range(layout.num_layers):
            handle.send_layer(layer, pack_layer(src[layer], src_ids))
        handle.finish(30)
        pending.wait(30)
    finally:
        sender.close()
        receiver.close()
    others = [b for b in range(12) if b not in dst_ids]
    for s, d, b in zip(src, dst, before, strict=True):
        assert d.device.type == "cuda"
        assert torch.equal(d[:, dst_ids].cpu(), s[:, src_ids].cpu())
        assert torch.equal(d[:, others], b[:, others])
