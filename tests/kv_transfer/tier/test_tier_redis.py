"""The Redis level against real redis-servers (plain, AUTH, mutual TLS): sharing between
pods, keys and TTLs, damage and expiry counted as misses, a crashed and restarted Redis,
tenant salts, and the bounds on concurrency and bytes in flight."""

from __future__ import annotations

import threading
import time

import pytest
from redis_server import RedisServer, make_tls_files
from tier_helpers import PASSWORD, metric, payload_of, prompt_hashes, random_layers, store_all

from kv_transfer.tier import ChunkSpec, KVTier, RedisTierConfig, encode_value, redis_key


def _config(server: RedisServer, **changes: object) -> RedisTierConfig:
    tls = {}
    if server.tls:
        tls = {"ca_file": str(server.tls.ca_cert), "cert_file": str(server.tls.client_cert),
               "key_file": str(server.tls.client_key)}
    return RedisTierConfig(url=server.url, **{**tls, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("server_name", ["redis_plain", "redis_auth", "redis_tls"])
def test_chunks_stored_by_one_pod_load_bit_exact_in_another(server_name, request, spec,
                                                            make_tier):
    server: RedisServer = request.getfixturevalue(server_name)
    writer = make_tier(spec, host_bytes=0, redis=_config(server, ttl_s=600))
    reader = make_tier(spec, host_bytes=64 << 20, redis=_config(server))
    hashes = prompt_hashes(spec, 4, seed=1)
    chunks = store_all(writer, hashes)
    assert reader.lookup(hashes).result(5) == 4
    assert [bytes(p) for p in reader.load(hashes).result(10)] == [payload_of(c) for c in chunks]
    assert metric(reader, "pdserve:kv_tier_hits_total", level="redis") == 4
    # a Redis hit is also kept in the reader's host tier: the next load never leaves the pod
    assert [bytes(p) for p in reader.load(hashes).result(10)] == [payload_of(c) for c in chunks]
    assert metric(reader, "pdserve:kv_tier_hits_total", level="host") == 4
    assert metric(reader, "pdserve:kv_tier_hits_total", level="redis") == 4
    client = server.client()
    key = f"pdserve:kv:v1:{spec.fingerprint}:{hashes[0].hex()}"
    assert redis_key(spec.fingerprint, hashes[0]) == key
    assert client.strlen(key) == spec.value_bytes and 590 <= client.ttl(key) <= 600
    assert metric(writer, "pdserve:kv_tier_bytes_total", level="redis", op="store") == \
        4 * spec.value_bytes
    client.close()


def test_a_load_reads_consecutive_chunks_and_stops_at_the_first_absent_one(redis_plain, spec,
                                                                           make_tier):
    tier = make_tier(spec, host_bytes=0, redis=_config(redis_plain))
    hashes = prompt_hashes(spec, 4, seed=2)
    chunks = store_all(tier, [hashes[i] for i in (0, 1, 3)])
    assert tier.lookup(hashes).result(5) == 2
    assert [bytes(p) for p in tier.load(hashes).result(5)] == [payload_of(c) for c in chunks[:2]]
    assert metric(tier, "pdserve:kv_tier_misses_total", level="redis") == 1


def _flip_payload(value: bytes, spec: ChunkSpec) -> bytes:
    b = bytearray(value)
    b[-7] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("tamper, reason", [
    ("flipped-byte", "checksum"), ("other-layout", "layout"), ("truncated", "truncated"),
    ("other-chunk", "hash"),
])
def test_a_damaged_value_in_redis_is_counted_never_used_and_a_new_store_repairs_it(
        tamper, reason, redis_plain, spec, make_tier):
    writer = make_tier(spec, host_bytes=0, redis=_config(redis_plain))
    reader = make_tier(spec, host_bytes=64 << 20, redis=_config(redis_plain))
    hashes = prompt_hashes(spec, 3, seed=3)
    chunks = store_all(writer, hashes)
    client = redis_plain.client()
    key = redis_key(spec.fingerprint, hashes[1])
    good = client.get(key)
    if tamper == "flipped-byte":
        bad = _flip_payload(good, spec)
    elif tamper == "other-layout":
        other = ChunkSpec(spec.layout.__class__(**{**_fields(spec), "num_kv_heads": 1}))
        bad = bytes(encode_value(other, hashes[1], random_layers(other, 0)))
    elif tamper == "truncated":
        bad = good[:-100]
    else:
        bad = client.get(redis_key(spec.fingerprint, hashes[2]))
    client.set(key, bad)
    loaded = reader.load(hashes).result(5)
    assert [bytes(p) for p in loaded] == [payload_of(chunks[0])]
    assert metric(reader, "pdserve:kv_tier_corrupt_total", level="redis", reason=reason) == 1
    assert not reader.host.contains(hashes[1])
    # the engine recomputes the chunk and stores it again: the key holds a good value again
    assert writer.submit_store(hashes[1], chunks[1]) and writer.flush(5)
    assert [bytes(p) for p in reader.load(hashes).result(5)] == [payload_of(c) for c in chunks]
    client.close()


def _fields(spec: ChunkSpec) -> dict[str, object]:
    lay = spec.layout
    return {f: getattr(lay, f) for f in lay.__dataclass_fields__}


def test_a_key_that_expires_between_look_up_and_read_is_a_miss(redis_plain, spec, make_tier):
    tier = make_tier(spec, host_bytes=0, redis=_config(redis_plain))
    hashes = prompt_hashes(spec, 3, seed=4)
    chunks = store_all(tier, hashes)
    assert tier.lookup(hashes).result(5) == 3
    client = redis_plain.client()
    assert client.pexpire(redis_key(spec.fingerprint, hashes[1]), 1)
    time.sleep(0.05)
    assert [bytes(p) for p in tier.load(hashes).result(5)] == [payload_of(chunks[0])]
    assert metric(tier, "pdserve:kv_tier_misses_total", level="redis") == 1
    assert metric(tier, "pdserve:kv_tier_errors_total", level="redis", op="load") == 0
    assert metric(tier, "pdserve:kv_tier_corrupt_total", level="redis", reason="truncated") == 0
    client.close()


def test_wrong_credentials_or_an_unknown_ca_skip_redis_quickly(redis_auth, redis_tls, spec,
                                                               make_tier, tmp_path):
    hashes = prompt_hashes(spec, 2, seed=5)
    store_all(make_tier(spec, host_bytes=0, redis=_config(redis_auth)), hashes)
    no_pass = redis_auth.url.replace(f":{PASSWORD}@", "")
    wrong_ca = make_tls_files(tmp_path / "other-ca").ca_cert
    for config in (RedisTierConfig(url=no_pass),
                   RedisTierConfig(url=redis_auth.url.replace(PASSWORD, "nope")),
                   _config(redis_tls, ca_file=str(wrong_ca))):
        tier = make_tier(spec, host_bytes=0, redis=config)
        t0 = time.monotonic()
        assert tier.lookup(hashes).result(5) == 0
        assert tier.load(hashes).result(5) == []
        assert time.monotonic() - t0 < 2.0
        assert metric(tier, "pdserve:kv_tier_errors_total", level="redis", op="lookup") == 1
        assert metric(tier, "pdserve:kv_tier_redis_up") == 0


def test_redis_killed_mid_run_is_skipped_with_bounded_latency_and_used_again_once_back(
        own_redis, spec, make_tier):
    server = own_redis()
    config = _config(server, connect_timeout_s=0.5, backoff_initial_s=0.2, backoff_max_s=1.0)
    tier = make_tier(spec, host_bytes=0, redis=config)
    hashes = prompt_hashes(spec, 6, seed=6)
    store_all(tier, hashes[:2])
    assert tier.lookup(hashes[:2]).result(5) == 2
    # Traffic from another thread runs through the crash and the restart (loads in flight
    # when the server dies included): none may fail or hang.
    traffic = _Traffic(tier, hashes[:2])
    traffic.start()

    server.kill9()
    worst, t_end = 0.0, time.monotonic() + 1.5
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        assert tier.lookup(hashes[:2]).result(5) == 0
        assert tier.load(hashes[:2]).result(5) == []
        assert tier.submit_store(hashes[2], random_layers(spec, 2))  # queued, skipped later
        assert tier.flush(5)
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    assert worst < 1.0, f"an operation took {worst:.2f} s while Redis was down"
    assert metric(tier, "pdserve:kv_tier_redis_up") == 0
    assert metric(tier, "pdserve:kv_tier_stores_dropped_total", reason="redis_skipped") >= 1
    errors = sum(metric(tier, "pdserve:kv_tier_errors_total", level="redis", op=op)
                 for op in ("lookup", "load", "store"))
    # the breaker tried Redis only a few times (the first failures, then about one probe per
    # backoff), not on each of the ~100 calls made meanwhile
    assert 1 <= errors <= 10, errors

    server.start()
    deadline = time.monotonic() + 5
    while True:
        assert tier.submit_store(hashes[3], random_layers(spec, 3)) and tier.flush(5)
        if tier.lookup(hashes[3:4]).result(5) == 1:
            break
        assert time.monotonic() < deadline, "the tier did not use Redis again after restart"
        time.sleep(0.1)
    assert metric(tier, "pdserve:kv_tier_redis_up") == 1
    other_pod = make_tier(spec, host_bytes=0, redis=config)
    assert len(other_pod.load(hashes[3:4]).result(5)) == 1
    traffic.stop()
    assert traffic.errors == [] and traffic.calls > 10
    assert traffic.worst < 1.5, f"a load took {traffic.worst:.2f} s"


class _Traffic(threading.Thread):
    def __init__(self, tier: KVTier, hashes: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.tier, self.hashes = tier, hashes
        self.errors: list[BaseException] = []
        self.worst, self.calls = 0.0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            t0 = time.monotonic()
            try:
                self.tier.load(self.hashes).result(10)
                self.tier.lookup(self.hashes).result(10)
            except BaseException as exc:
                self.errors.append(exc)
            self.worst = max(self.worst, time.monotonic() - t0)
            self.calls += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


def test_different_cache_salts_never_share_an_entry(redis_plain, spec, make_tier):
    tier = make_tier(spec, host_bytes=64 << 20, redis=_config(redis_plain))
    salted_a = prompt_hashes(spec, 3, seed=7, salt="tenant-a")
    salted_b = prompt_hashes(spec, 3, seed=7, salt="tenant-b")  # the same tokens
    unsalted = prompt_hashes(spec, 3, seed=7)
    assert not set(salted_a) & set(salted_b) | set(salted_a) & set(unsalted)
    store_all(tier, salted_a)
    client = redis_plain.client()
    keys = {k.decode() for k in client.scan_iter(f"pdserve:kv:v1:{spec.fingerprint}:*")}
    assert keys == {redis_key(spec.fingerprint, h) for h in salted_a}
    other = make_tier(spec, host_bytes=64 << 20, redis=_config(redis_plain))
    for hashes in (salted_b, unsalted):
        assert tier.lookup(hashes).result(5) == 0 and other.lookup(hashes).result(5) == 0
        assert tier.load(hashes).result(5) == [] and other.load(hashes).result(5) == []
    assert other.lookup(salted_a).result(5) == 3
    client.close()


def test_redis_work_is_bounded_in_concurrency_and_bytes_in_flight(own_redis, spec, make_tier):
    server = own_redis()
    tier = make_tier(spec, host_bytes=0, redis=_config(server, op_timeout_s=10),
                     max_concurrency=2, max_inflight_bytes=4 * spec.value_bytes)
    client = server.client()
    hashes = prompt_hashes(spec, 6, seed=8)
    client.client_pause(1500, all=False)  # writes block until the pause ends
    accepted = [tier.submit_store(h, random_layers(spec, i)) for i, h in enumerate(hashes)]
    assert accepted == [True] * 4 + [False] * 2
    time.sleep(0.5)
    others = [c for c in client.client_list() if c["id"] != str(client.client_id())]
    assert 1 <= len(others) <= 2, others
    assert tier.budget.used == 4 * spec.value_bytes
    assert tier.flush(10) and tier.budget.used == 0
    assert tier.lookup(hashes).result(5) == 4
    assert metric(tier, "pdserve:kv_tier_stores_dropped_total", reason="budget") == 2
    client.close()


def test_an_offload_goes_to_the_host_tier_only(redis_plain, spec, make_tier):
    tier = make_tier(spec, host_bytes=64 << 20, redis=_config(redis_plain))
    hashes = prompt_hashes(spec, 2, seed=9)
    assert tier.submit_store(hashes[0], random_layers(spec, 0), to_redis=False)
    assert tier.submit_store(hashes[1], random_layers(spec, 1))
    assert tier.flush(5)
    client = redis_plain.client()
    assert client.exists(redis_key(spec.fingerprint, hashes[0])) == 0
    assert client.exists(redis_key(spec.fingerprint, hashes[1])) == 1
    assert tier.host.contains(hashes[0]) and tier.host.contains(hashes[1])
    client.close()
