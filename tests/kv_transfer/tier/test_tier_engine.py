"""The KV tier inside an engine (engine/tier_cache.py over kv_transfer/tier/engine_port.py):
the real engine, the real tier, a real redis-server; answers compared with transformers.

- a prompt computed by one engine is loaded by another (host level, then Redis) and only
  its tail computed: ``num_cached_tokens`` counts the loaded chunks, tokens stay exact;
- a key that expires between the look-up and the read is a counted miss, recomputed;
- a chunk evicted from the engine's KV cache goes to the host level first (offload), so the
  repeated prompt is a load, not a recompute.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hf_reference import hf_greedy
from redis_server import RedisServer
from tier_helpers import metric

from engine.llm_engine import EngineArgs, LLMEngine
from engine.prefix_hash import chain_seed, chunk_hashes
from engine.sampling_params import SamplingParams
from kv_transfer.tier import ChunkSpec, KVTier, RedisTierConfig, TierConfig, TierMetrics, redis_key
from kv_transfer.tier.engine_port import TierPort

NEW = 5


def run(engine: LLMEngine, rid: str, prompt: list[int], timeout: float = 60
        ) -> tuple[list[int], int]:
    """Greedy ``NEW`` tokens of ``prompt`` on ``engine``: (tokens, num_cached_tokens)."""
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=NEW,
                                                   ignore_eos=True))
    tokens: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        engine.housekeeping()
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.deltas[0].token_ids
                if out.finished:
                    engine.flush_tier_stores()
                    return tokens, out.num_cached_tokens
        assert time.monotonic() < deadline, "the request never finished"
        time.sleep(0.001)


@pytest.fixture
def engines(default_model_dir: Path) -> Iterator[Callable[..., LLMEngine]]:
    tiers: list[KVTier] = []

    def make(redis: RedisServer | None = None, num_kv_blocks: int = 256,
             port_class: type[TierPort] = TierPort, **config: object) -> LLMEngine:
        engine = LLMEngine(default_model_dir, EngineArgs(num_kv_blocks=num_kv_blocks,
                                                          dtype="float32"))
        redis_config = RedisTierConfig(redis.url) if redis is not None else None
        tier = KVTier(ChunkSpec(engine.layout),
                      TierConfig(redis=redis_config, **config),  # type: ignore[arg-type]
                      TierMetrics())
        tiers.append(tier)
        engine.attach_kv_tier(port_class(tier, engine.kv_memory))
        return engine

    yield make
    for tier in tiers:
        tier.close(timeout=5)


def _tier(engine: LLMEngine) -> KVTier:
    assert engine.tier is not None
    port = engine.tier.port
    assert isinstance(port, TierPort)
    return port.tier


def _prompt(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(2048), k=n)


def test_a_prompt_from_another_engine_loads_from_redis_and_computes_only_its_tail(
        engines, redis_plain, default_model_dir) -> None:
    prompt = _prompt(11, 1100)
    want = hf_greedy(default_model_dir, [prompt], NEW)[0]
    first = engines(redis_plain)
    assert run(first, "a", prompt) == (want, 0)
    assert _tier(first).flush(20)
    second = engines(redis_plain)  # its own host level: empty
    tokens, cached = run(second, "b", prompt)
    assert tokens == want
    assert cached == 4 * 256
    assert metric(_tier(second), "pdserve:kv_tier_hits_total", level="redis") == 4


class ExpiringPort(TierPort):
    """Deletes the chunks' keys right after the look-up found them (as an expiry would)."""

    expire: Callable[[Sequence[bytes]], None] = staticmethod(lambda hashes: None)

    def lookup(self, chunk_hashes, wake):  # type: ignore[no-untyped-def]
        fut = super().lookup(chunk_hashes, wake)
        fut.result(10)
        type(self).expire(chunk_hashes)
        return fut


def test_a_key_that_expires_between_look_up_and_read_is_a_counted_miss(
        engines, redis_plain, default_model_dir) -> None:
    prompt = _prompt(12, 700)
    want = hf_greedy(default_model_dir, [prompt], NEW)[0]
    writer = engines(redis_plain)
    run(writer, "w", prompt)
    assert _tier(writer).flush(20)
    fingerprint = writer.layout.fingerprint
    hashes = chunk_hashes(prompt[:-1], 16, chain_seed(writer.layout.model_id))
    with redis_plain.client() as client:
        assert all(client.exists(redis_key(fingerprint, h)) for h in hashes)

        def expire(found: Sequence[bytes]) -> None:
            client.delete(redis_key(fingerprint, found[1]))  # the second chunk expires

        ExpiringPort.expire = staticmethod(expire)
        reader = engines(redis_plain, port_class=ExpiringPort)
        tokens, cached = run(reader, "r", prompt)
    assert tokens == want
    assert cached == 256  # the first chunk came; the rest was computed
    tier = _tier(reader)
    assert metric(tier, "pdserve:kv_tier_hits_total", level="redis") == 1
    assert metric(tier, "pdserve:kv_tier_misses_total", level="redis") == 1


def test_evicted_chunks_go_to_the_host_level_and_come_back_from_it(
        engines, default_model_dir) -> None:
    # no Redis: 100 blocks hold one 1,100-token prompt (69 blocks) and not two
    engine = engines(None, num_kv_blocks=100)
    prompt, other = _prompt(13, 1100), _prompt(14, 1100)
    want = hf_greedy(default_model_dir, [prompt], NEW)[0]
    assert run(engine, "a", prompt) == (want, 0)
    tier = _tier(engine)
    assert tier.flush(20) and tier.host is not None and len(tier.host) == 4
    tier.host.clear()  # only an offload can bring them back now
    run(engine, "b", other)  # other traffic evicts the first prompt's blocks
    assert tier.flush(20)
    # the second prompt's 4 chunks, and the 3 of the first whose blocks it took (offload;
    # the first chunk's blocks, freed last, are still cached)
    assert len(tier.host) == 4 + 3
    tokens, cached = run(engine, "c", prompt)
    assert tokens == want
    assert cached == 4 * 256  # 1 chunk from the KV cache, 3 from the host level
    assert metric(tier, "pdserve:kv_tier_hits_total", level="host") == 3
