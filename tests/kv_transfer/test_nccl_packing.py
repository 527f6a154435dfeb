"""The nccl backend's packing (one message per group of layers) on the CPU: what ``pack``
puts in the buffer is each layer's K then V of the named blocks in the request's order,
and ``unpack`` puts exactly that back into the named blocks and nowhere else."""

from __future__ import annotations

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from kv_transfer.backends.nccl.packing import empty_packed, pack, unpack
from kv_transfer.backends.nccl.protocol import one_run

POOL = 24


@pytest.mark.parametrize("src_ids,dst_ids", [
    ([3, 4, 5, 6], [10, 11, 12, 13]),  # runs on both sides
    ([3, 4, 5, 6], [17, 2, 9, 0]),  # a run packed, scattered on arrival
    ([20, 1, 7, 13, 2], [5, 6, 7, 8, 9]),  # gathered, one run on arrival
    ([20, 1, 7, 13, 2], [2, 13, 7, 1, 20]),  # scattered on both sides
    ([9], [0]),  # one block
])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_layers_land_in_the_named_blocks_only(src_ids, dst_ids, dtype) -> None:
    layout = make_layout(dtype, num_layers=5)
    src = random_caches(layout, POOL, seed=1)
    dst = random_caches(layout, POOL, seed=2)
    before = [kv.clone() for kv in dst]
    n = len(src_ids)
    for first, count in ((0, 3), (3, 2)):  # two groups of layers, as a header's chunks
        layers = range(first, first + count)
        out = empty_packed(src[0], count, n)
        pack([src[i] for i in layers], torch.tensor(src_ids), one_run(src_ids), n, out)
        for j, i in enumerate(layers):  # layer-major, K before V, the request's block order
            for b, block in enumerate(src_ids):
                assert torch.equal(out[j, 0, b], src[i][0, block])
                assert torch.equal(out[j, 1, b], src[i][1, block])
        unpack(out, [dst[i] for i in layers], torch.tensor(dst_ids), one_run(dst_ids))
    others = [b for b in range(POOL) if b not in dst_ids]
    for s, d, b in zip(src, dst, before, strict=True):
        assert torch.equal(d[:, dst_ids], s[:, src_ids])
        assert torch.equal(d[:, others], b[:, others])
