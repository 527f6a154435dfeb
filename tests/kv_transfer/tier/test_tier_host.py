"""The host-memory tier alone (the one-machine default): LRU within its byte budget, exact
round trips through ``KVTier``, and the bound on bytes in flight."""

from __future__ import annotations

import asyncio
import threading

import pytest
from tier_helpers import metric, payload_of, prompt_hashes, random_layers, store_all

from kv_transfer.tier import HostTier


def test_the_host_tier_keeps_the_most_recently_used_values_within_its_budget():
    evicted: list[int] = []
    host = HostTier(300, on_evict=evicted.append)
    for i in range(3):
        assert host.put(bytes([i]), bytes(100))
    assert host.get(b"\x00") is not None  # 0 is now the most recent; 1 the least
    assert host.put(b"\x03", bytes(100))
    assert not host.contains(b"\x01") and host.contains(b"\x00") and len(host) == 3
    assert host.used_bytes == 300 and evicted == [1]
    assert host.put(b"\x04", bytes(250))  # leaves room for nothing else
    assert host.used_bytes == 250 and evicted == [1, 3] and host.leading([b"\x04"]) == 1
    assert not host.put(b"\x05", bytes(301))  # larger than the budget: refused, nothing lost
    assert host.contains(b"\x04")
    assert host.put(b"\x04", bytes(10)) and host.used_bytes == 10  # replacing resizes


def test_a_looked_up_prefix_loads_back_bit_exact_and_stops_at_the_first_gap(spec, make_tier):
    tier = make_tier(spec, host_bytes=64 << 20)
    hashes = prompt_hashes(spec, 5, seed=1)
    chunks = store_all(tier, [hashes[i] for i in (0, 1, 2, 4)])
    assert tier.lookup(hashes).result(5) == 3
    loaded = tier.load(hashes).result(5)
    assert [bytes(p) for p in loaded] == [payload_of(c) for c in chunks[:3]]
    assert tier.load(hashes, max_chunks=2).result(5) == loaded[:2]
    assert metric(tier, "pdserve:kv_tier_hits_total", level="host") == 5
    assert metric(tier, "pdserve:kv_tier_misses_total", level="host") == 1
    assert metric(tier, "pdserve:kv_tier_bytes_total", level="host", op="store") == \
        4 * spec.value_bytes


def test_the_host_tier_evicts_least_recently_used_chunks_to_stay_in_budget(spec, make_tier):
    tier = make_tier(spec, host_bytes=3 * spec.value_bytes)
    hashes = prompt_hashes(spec, 5, seed=2)
    store_all(tier, hashes[:3])
    assert len(tier.load(hashes[:1]).result(5)) == 1  # chunk 0 used: chunk 1 is now oldest
    store_all(tier, hashes[3:5], seed=3)
    present = [tier.host.contains(h) for h in hashes]
    assert present == [True, False, False, True, True]
    assert tier.host.used_bytes <= 3 * spec.value_bytes
    assert metric(tier, "pdserve:kv_tier_evictions_total", level="host") == 2
    assert metric(tier, "pdserve:kv_tier_host_bytes") == tier.host.used_bytes


def test_stores_beyond_the_bytes_in_flight_bound_are_refused_not_queued(spec, make_tier):
    tier = make_tier(spec, host_bytes=64 << 20, max_inflight_bytes=2 * spec.value_bytes,
                     encode_threads=1)
    # Hold the encoder thread so that accepted stores stay in flight.
    gate = threading.Event()
    tier._encoder.submit(gate.wait, 10)
    hashes = prompt_hashes(spec, 4, seed=4)
    accepted = [tier.submit_store(h, random_layers(spec, i)) for i, h in enumerate(hashes)]
    assert accepted == [True, True, False, False]
    assert tier.budget.used == 2 * spec.value_bytes
    assert metric(tier, "pdserve:kv_tier_stores_dropped_total", reason="budget") == 2
    gate.set()
    assert tier.flush(10) and tier.budget.used == 0
    assert tier.lookup(hashes).result(5) == 2
    assert tier.submit_store(hashes[2], random_layers(spec, 2))  # room again
    assert tier.flush(10) and tier.lookup(hashes).result(5) == 3


def test_results_can_be_awaited_from_another_event_loop(spec, make_tier):
    tier = make_tier(spec)
    hashes = prompt_hashes(spec, 2, seed=5)
    chunks = store_all(tier, hashes)

    async def pod() -> tuple[int, list[bytes]]:
        n = await tier.lookup_async(hashes)
        payloads = await tier.load_async(hashes)
        return n, [bytes(p) for p in payloads]

    n, payloads = asyncio.run(pod())
    assert n == 2 and payloads == [payload_of(c) for c in chunks]


def test_a_closed_tier_answers_misses_and_refuses_stores(spec, make_tier):
    tier = make_tier(spec)
    hashes = prompt_hashes(spec, 1, seed=6)
    store_all(tier, hashes)
    tier.close()
    assert tier.lookup(hashes).result(1) == 0 and tier.load(hashes).result(1) == []
    assert not tier.submit_store(hashes[0], random_layers(spec, 0))
    assert metric(tier, "pdserve:kv_tier_stores_dropped_total", reason="closed") == 1


def test_stored_tensors_may_be_any_strided_view_and_are_copied_at_encode(spec, make_tier):
    tier = make_tier(spec)
    h = prompt_hashes(spec, 1, seed=7)[0]
    layers = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in random_layers(spec, 7)]
    expected = payload_of(layers)
    assert tier.submit_store(h, layers) and tier.flush(5)
    for t in layers:
        t.zero_()  # the caller reuses its buffers: the stored value must not change
    assert bytes(tier.load([h]).result(5)[0]) == expected


def test_a_store_of_the_wrong_shape_is_refused_at_once(spec, make_tier):
    tier = make_tier(spec)
    layers = random_layers(spec, 0)
    h = prompt_hashes(spec, 1, seed=8)[0]
    for bad_hash, bad_layers in ((h, layers[:-1]), (h, [layers[0].float(), *layers[1:]]),
                                 (h[:8], layers)):
        with pytest.raises(ValueError, match="16-byte hash"):
            tier.submit_store(bad_hash, bad_layers)
    assert tier.budget.used == 0 and tier.flush(1)
