"""ucx with fragmented pools (staging.py): scattered blocks on either side go through a
staging slot and land exactly; a slot too small for the transfer falls back to block
descriptors; every slot is free again afterwards. NIXL on the CPU (shared memory / cma)."""

from __future__ import annotations

import random

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from engine.kv_layout import KVMemory
from kv_transfer import ConnectorConfig, KVTargetSpec, introduce, make_receiver, make_sender
from kv_transfer.backends.ucx.agent import nixl_missing

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(nixl_missing() is not None, reason=str(nixl_missing()))]

POOL = 64
rng = random.Random(5)
FRAGMENTED = rng.sample(range(POOL), 12)  # 12 blocks in (almost surely) more than 4 runs
RUN = list(range(20, 32))


@pytest.mark.parametrize("staging_bytes", [1 << 20, 1024])  # 1 KiB: no slot ever fits
@pytest.mark.parametrize("src_ids,dst_ids", [
    (FRAGMENTED, list(reversed(FRAGMENTED))),  # packed on both sides
    (RUN, FRAGMENTED),  # straight from the blocks into the receiver's slot
    (FRAGMENTED, RUN),  # from the sender's slot straight into the blocks
])
def test_fragmented_blocks_land_exactly(src_ids, dst_ids, staging_bytes) -> None:
    layout = make_layout("bfloat16", num_layers=3)
    src = random_caches(layout, POOL, seed=1)
    dst = random_caches(layout, POOL, seed=2)
    before = [kv.clone() for kv in dst]
    config = ConnectorConfig(staging_bytes=staging_bytes)
    receiver = make_receiver("ucx", KVMemory(layout, tuple(dst)), config)
    sender = make_sender("ucx", KVMemory(layout, tuple(src)), config)
    try:
        introduce(receiver, sender)
        for round_ in range(3):  # slots are given back: later transfers get them again
            tid = f"frag-{round_}"
            pending = receiver.expect(tid, dst_ids)
            handle = sender.begin(KVTargetSpec("ucx", receiver.address, tid, tuple(dst_ids),
                                               layout.fingerprint))
            for layer in range(layout.num_layers):
                handle.layer_written(layer, src_ids, None)
            handle.wait(20)
            pending.wait(20)
        free = [end._loop.run(lambda e=end: e._staging._free) for end in (sender, receiver)]
    finally:
        sender.close()
        receiver.close()
    others = [b for b in range(POOL) if b not in dst_ids]
    for s, d, b in zip(src, dst, before, strict=True):
        assert torch.equal(d[:, dst_ids], s[:, src_ids])
        assert torch.equal(d[:, others], b[:, others])
    for end_free, size in zip(free, (sender._staging.size, receiver._staging.size),
                              strict=True):
        assert end_free == ([(0, size)] if size else []), end_free
