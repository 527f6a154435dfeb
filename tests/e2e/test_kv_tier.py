"""The shared KV tier end to end: real pods (2 prefill + 1 decode behind ``pdserve up``), a
real redis-server on a free port (plain, then AUTH + mutual TLS with certificates made
here), the official openai client; every answer compared with transformers' greedy.

- a 1,000+ token prompt computed by one prefill pod is served by the other from Redis:
  ``cached_tokens`` >= 1000 - 256 and only the tail computed (plain and ``rediss://``);
- a flipped byte, a value of another layout and a truncated value are detected, counted,
  recomputed and never used;
- Redis killed (-9) mid-run: every request still succeeds; restarted: used again;
- different ``cache_salt`` values never share an entry (Redis keys and ``cached_tokens``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from e2e_helpers import POD_ARGS, Stack, start_stack
from hf_reference import hf_greedy
from redis_server import RedisServer, TLSFiles, make_tls_files, start_or_skip
from tier_e2e_helpers import (
    NEW_TOKENS,
    complete,
    pod_spec,
    prefill_metric,
    prompt_keys,
    prompt_of,
    served_prefill,
    wait_keys,
)

from engine.prefix_hash import chain_seed, chunk_hashes
from kv_transfer.tier import ChunkSpec, encode_value
from kv_transfer.tier.codec import HEADER_SIZE

pytestmark = pytest.mark.timeout(420)

PASSWORD = "tier-e2e-pass"
OK = "pdserve:requests_total"
TIER_HITS = "pdserve:kv_tier_hits_total"


@contextmanager
def _stack(model_dir: Path, log_dir: Path, tier_flags: str) -> Iterator[Stack]:
    # least-loaded: consecutive requests alternate between the two prefill pods
    with start_stack(model_dir, log_dir, "--prefill", "2", "--decode", "1",
                     "--pod-args", f"{POD_ARGS} {tier_flags} --kv-tier-connect-timeout 0.5",
                     "--router-args", "--routing least-loaded") as stack:
        yield stack


@pytest.fixture(scope="module")
def redis_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(RedisServer(tmp_path_factory.mktemp("tier-e2e-redis")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tier_stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
               redis_plain: RedisServer) -> Iterator[Stack]:
    with _stack(default_model_dir, tmp_path_factory.mktemp("tier-e2e"),
                f"--kv-tier {redis_plain.url}") as stack:
        yield stack


def check_served_by_another_prefill_pod_from_redis(stack: Stack, server: RedisServer,
                                                   seed: int) -> None:
    prompt = prompt_of(seed, 1100)
    want = hf_greedy(stack.model_dir, [prompt], NEW_TOKENS)[0]
    spec = pod_spec(stack.model_dir)
    keys = prompt_keys(spec, prompt)
    assert len(keys) == 4
    before = prefill_metric(stack, OK, 'outcome="ok",role="prefill"')
    tokens, cached = complete(stack, prompt)
    assert tokens == want and cached == 0
    first = served_prefill(before, prefill_metric(stack, OK, 'outcome="ok",role="prefill"'))
    with server.client() as client:
        wait_keys(client, keys)
    for _ in range(4):  # until the other prefill pod serves it (least-loaded alternates)
        before = prefill_metric(stack, OK, 'outcome="ok",role="prefill"')
        hits_before = prefill_metric(stack, TIER_HITS, 'level="redis"')
        tokens, cached = complete(stack, prompt)
        assert tokens == want
        pod = served_prefill(before, prefill_metric(stack, OK, 'outcome="ok",role="prefill"'))
        if pod != first:
            break
    else:
        pytest.fail("the second prefill pod never served the prompt")
    # the prefix came from Redis (its 4 full chunks); only the tail was computed
    assert cached >= 1000 - 256
    assert cached == 4 * 256
    hits = prefill_metric(stack, TIER_HITS, 'level="redis"')
    assert hits[pod] - hits_before[pod] == 4


def test_a_prompt_computed_once_is_served_by_another_prefill_pod_from_redis(
        tier_stack: Stack, redis_plain: RedisServer) -> None:
    check_served_by_another_prefill_pod_from_redis(tier_stack, redis_plain, seed=1)


def _flip(value: bytes) -> bytes:
    out = bytearray(value)
    out[HEADER_SIZE + len(out) // 3] ^= 0x10
    return bytes(out)


def test_corrupt_foreign_and_truncated_values_are_counted_and_recomputed(
        tier_stack: Stack, redis_plain: RedisServer) -> None:
    spec = pod_spec(tier_stack.model_dir)
    other = ChunkSpec(pod_spec(tier_stack.model_dir, block_size=32).layout)
    cases = {"checksum": lambda h: _flip(bytes(encode_value(spec, h, _layers(spec)))),
             "layout": lambda h: bytes(encode_value(other, h, _layers(other))),
             "truncated": lambda h: bytes(encode_value(spec, h, _layers(spec)))[:-100]}
    prompts = {reason: prompt_of(100 + i, 300) for i, reason in enumerate(cases)}
    wants = dict(zip(prompts, hf_greedy(tier_stack.model_dir, list(prompts.values()),
                                        NEW_TOKENS), strict=True))
    with redis_plain.client() as client:
        for reason, make in cases.items():
            (h,) = chunk_hashes(prompts[reason][:-1], 16, chain_seed(spec.layout.model_id))
            (key,) = prompt_keys(spec, prompts[reason])
            client.set(key, make(h))  # what a pod will find for the prompt's first chunk
        for reason in cases:
            label = f'level="redis",reason="{reason}"'
            before = sum(prefill_metric(tier_stack, "pdserve:kv_tier_corrupt_total",
                                        label).values())
            tokens, cached = complete(tier_stack, prompts[reason])
            assert tokens == wants[reason], reason  # exact: the bad value was never used
            assert cached == 0, reason
            after = sum(prefill_metric(tier_stack, "pdserve:kv_tier_corrupt_total",
                                       label).values())
            assert after - before == 1, reason


def _layers(spec: ChunkSpec) -> list:
    import torch

    return [torch.randn(spec.layer_shape).to(spec.layout.torch_dtype)
            for _ in range(spec.layout.num_layers)]


def test_redis_killed_and_restarted_mid_run(tier_stack: Stack, redis_plain: RedisServer) -> None:
    spec = pod_spec(tier_stack.model_dir)
    prompts = [prompt_of(200 + i, 600) for i in range(3)]
    wants = hf_greedy(tier_stack.model_dir, prompts, NEW_TOKENS)
    redis_plain.kill9()
    try:
        for prompt, want in zip(prompts, wants, strict=True):  # Redis is down
            t0 = time.monotonic()
            tokens, _ = complete(tier_stack, prompt)
            assert tokens == want
            assert time.monotonic() - t0 < 10  # skipped within a bounded connect timeout
    finally:
        redis_plain.start()  # the same port, empty
    deadline = time.monotonic() + 40
    with redis_plain.client() as client:
        for seed in range(210, 260):  # new prompts until one's chunks reach Redis again
            prompt = prompt_of(seed, 600)
            tokens, _ = complete(tier_stack, prompt)
            assert tokens == hf_greedy(tier_stack.model_dir, [prompt], NEW_TOKENS)[0]
            time.sleep(0.5)  # its store is written after the answer
            if all(client.exists(k) for k in prompt_keys(spec, prompt)):
                break
            assert time.monotonic() < deadline, "Redis was never used again"
    up = prefill_metric(tier_stack, "pdserve:kv_tier_redis_up")
    assert max(up.values()) == 1


def test_cache_salts_never_share_an_entry(tier_stack: Stack, redis_plain: RedisServer) -> None:
    spec = pod_spec(tier_stack.model_dir)
    prompt = prompt_of(300, 700)
    want = hf_greedy(tier_stack.model_dir, [prompt], NEW_TOKENS)[0]
    keys_a, keys_b = prompt_keys(spec, prompt, "tenant-a"), prompt_keys(spec, prompt, "tenant-b")
    assert not set(keys_a) & set(keys_b)
    with redis_plain.client() as client:
        tokens, cached = complete(tier_stack, prompt, salt="tenant-a")
        assert tokens == want and cached == 0
        wait_keys(client, keys_a)
        assert not any(client.exists(k) for k in keys_b)
        tokens, cached = complete(tier_stack, prompt, salt="tenant-b")  # another tenant
        assert tokens == want and cached == 0
        wait_keys(client, keys_b)
        for _ in range(2):  # tenant a again, on either prefill pod: its own entries
            tokens, cached = complete(tier_stack, prompt, salt="tenant-a")
            assert tokens == want and cached >= 2 * 256  # its pod cache or Redis
        unsalted = prompt_keys(spec, prompt)
        assert not any(client.exists(k) for k in unsalted)


def test_the_same_over_rediss_with_auth(default_model_dir: Path, tmp_path: Path) -> None:
    tls: TLSFiles = make_tls_files(tmp_path / "tls")
    server = start_or_skip(RedisServer(tmp_path / "redis", password=PASSWORD, tls=tls))
    try:
        flags = (f"--kv-tier {server.url} --kv-tier-ca-file {tls.ca_cert} "
                 f"--kv-tier-cert-file {tls.client_cert} --kv-tier-key-file {tls.client_key}")
        with _stack(default_model_dir, tmp_path, flags) as stack:
            check_served_by_another_prefill_pod_from_redis(stack, server, seed=2)
    finally:
        server.stop()


def test_with_no_redis_a_prompt_evicted_from_the_kv_cache_comes_back_from_host_memory(
        default_model_dir: Path, tmp_path: Path) -> None:
    # one decode pod prefilling itself, the default tier (host memory only), a KV cache of
    # 100 blocks: one 1,100-token prompt (69 blocks) fits, two do not
    with start_stack(default_model_dir, tmp_path, "--prefill", "0", "--decode", "1",
                     "--pod-args", "--dtype float32 --num-kv-blocks 100") as stack:
        (pod,) = stack.decode_pods()
        prompt, other = prompt_of(400, 1100), prompt_of(401, 1100)
        want = hf_greedy(stack.model_dir, [prompt], NEW_TOKENS)[0]
        assert complete(stack, prompt) == (want, 0)
        complete(stack, other)  # other traffic takes most of the first prompt's blocks
        hits = stack.pod_metric(pod, TIER_HITS, 'level="host"')
        tokens, cached = complete(stack, prompt)
        assert tokens == want
        assert cached == 4 * 256  # its first chunk from the KV cache, the rest from host memory
        assert stack.pod_metric(pod, TIER_HITS, 'level="host"') - hits == 3
        assert stack.pod_metric(pod, "pdserve:kv_tier_redis_up") == 0
