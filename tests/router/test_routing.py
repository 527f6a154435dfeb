"""Routing: least-loaded decode pod, fewest outstanding prefill tokens, unhealthy pods out.

The policy is tested on ``router.policy.LeastLoaded`` over ``router.pools.Pools`` directly
(plain objects, no network), then through a real router process over two scripted decode
pods, a dead one and prefill pods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from router_helpers import RouterProcess, free_port, start_router
from scripted_decode import ScriptedPod, start_load_only_prefill, start_scripted_pod

from protos import pdserve_pb2 as pb
from router.errors import APIError
from router.policy import LeastLoaded, RouteRequest
from router.pools import Pod, Pools, Role


def pod(role: Role, name: str, healthy: bool | None = True, **report: int) -> Pod:
    return Pod(role, name, channel=None, stub=None, health=None, healthy=healthy,
               report=pb.LoadReport(**report) if report else None)


ANY = RouteRequest([1, 2, 3])


def test_decode_pick_prefers_fewest_requests_then_most_free_blocks() -> None:
    pools = Pools([pod(Role.DECODE, "busy", running=3, free_blocks=900),
                   pod(Role.DECODE, "full", running=1, free_blocks=10),
                   pod(Role.DECODE, "roomy", running=1, free_blocks=500),
                   pod(Role.DECODE, "queued", running=0, waiting=2, free_blocks=999)])
    assert LeastLoaded(pools).pick_decode(ANY).address == "roomy"


def test_requests_sent_since_the_last_poll_spread_a_burst() -> None:
    pools = Pools([pod(Role.DECODE, f"d{i}", running=0, free_blocks=100) for i in range(4)])
    policy = LeastLoaded(pools)
    picks = []
    for _ in range(8):
        chosen = policy.pick_decode(ANY)
        pools.lease(chosen, None, 10)
        picks.append(chosen.address)
    assert Counter(picks) == {"d0": 2, "d1": 2, "d2": 2, "d3": 2}


def test_unhealthy_pods_are_skipped_and_none_left_is_a_503() -> None:
    pools = Pools([pod(Role.DECODE, "down", healthy=False, running=0, free_blocks=100),
                   pod(Role.DECODE, "up", running=5, free_blocks=1)])
    policy = LeastLoaded(pools)
    assert policy.pick_decode(ANY).address == "up"
    with pytest.raises(APIError) as info:
        policy.pick_decode(RouteRequest([1], exclude=frozenset({"up"})))
    assert info.value.status == 503


def test_prefill_pick_counts_outstanding_tokens_and_the_routers_own() -> None:
    a = pod(Role.PREFILL, "a", outstanding_prefill_tokens=100)
    b = pod(Role.PREFILL, "b", outstanding_prefill_tokens=300)
    d = pod(Role.DECODE, "d", running=0)
    pools = Pools([d, a, b])
    policy = LeastLoaded(pools)
    assert policy.pick_prefill(ANY) is a
    lease = pools.lease(d, a, 250)  # a: 350 now, counting what the router just sent
    assert policy.pick_prefill(ANY) is b
    pools.release(lease)
    pools.release(lease)  # releasing twice is harmless
    assert (a.in_flight, d.in_flight) == (0, 0)
    b.healthy = False
    a.healthy = False
    assert policy.pick_prefill(ANY) is None  # the decode pod then prefills locally


def test_the_context_limit_is_the_smallest_any_usable_pod_reports() -> None:
    small = pod(Role.DECODE, "small", max_model_len=300)
    big = pod(Role.PREFILL, "big", max_model_len=2048)
    down = pod(Role.DECODE, "down", healthy=False, max_model_len=100)
    silent = pod(Role.DECODE, "silent")  # reported nothing about its limits
    pools = Pools([small, big, down, silent])
    assert pools.context_limit(4096) == 300
    assert Pools([silent]).context_limit(4096) == 4096  # no report yet: config.json's


def test_pools_gain_and_lose_pods_while_serving() -> None:
    opened: list[str] = []

    def fake_connect(role: Role, address: str) -> Pod:  # no network: plain pods
        opened.append(address)
        return pod(role, address, running=0, free_blocks=10)

    async def main() -> None:
        pools = Pools(connector=fake_connect)
        policy = LeastLoaded(pools)
        pools.set_members(Role.DECODE, ["a", "b"])
        pools.set_members(Role.PREFILL, ["p"])
        assert sorted(p.address for p in pools.decode) == ["a", "b"]
        busy = pools.decode[0]
        lease = pools.lease(busy, None, 5)
        pools.set_members(Role.DECODE, ["c"] + [p.address for p in pools.decode
                                                if p is not busy])
        assert busy.leaving and busy not in pools.members  # gone from the pool at once...
        for _ in range(4):
            assert policy.pick_decode(ANY) is not busy  # ...so it gets no new request
        pools.release(lease)  # its last request is over: its channel may close
        assert sorted(p.address for p in pools.decode) == sorted({"a", "b", "c"} -
                                                                 {busy.address})
        pools.add(Role.DECODE, "c")  # idempotent
        assert opened == ["a", "b", "p", "c"]
        pools.remove("p")
        assert policy.pick_prefill(ANY) is None

    asyncio.run(main())


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RouterProcess, list[ScriptedPod], str]]:
    from engine.tokenizer import load_tokenizer

    eos = load_tokenizer(tiny_model).eos_token_id
    pods = [start_scripted_pod(eos), start_scripted_pod(eos)]
    idle_prefill, idle_server = start_load_only_prefill(0)
    busy_prefill, busy_server = start_load_only_prefill(10_000)
    dead = f"127.0.0.1:{free_port()}"
    router = start_router(tiny_model, [pods[0].address, dead, pods[1].address],
                          tmp_path_factory.mktemp("router-routing"),
                          "--prefill", f"{busy_prefill},{idle_prefill}")
    yield router, pods, idle_prefill
    router.stop()
    for p in pods:
        p.stop()
    idle_server.stop(grace=None)
    busy_server.stop(grace=None)


def test_concurrent_requests_spread_over_healthy_pods_only(cluster) -> None:
    router, pods, idle_prefill = cluster
    for p in pods:
        p.script.delay = 0.05  # long enough that the requests overlap
    body = {"prompt": "spread me around", "max_tokens": 8, "stream": True}

    def one(_: int) -> tuple[int, str]:
        r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30.0)
        return r.status_code, r.text

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    assert all(status == 200 and text.endswith("data: [DONE]\n\n") for status, text in results)
    counts = [len(p.script.requests) for p in pods]
    assert sum(counts) == 8 and min(counts) >= 2, counts
    # Every request names the prefill pod with the fewest outstanding tokens.
    assert {r.prefill_endpoint for p in pods for r in p.script.requests} == {idle_prefill}
    view = httpx.get(f"{router.url}/pools", timeout=10.0).json()["pods"]
    health = {(p["pool"], p["healthy"]) for p in view}
    assert sorted(p["healthy"] for p in view if p["pool"] == "decode") == [False, True, True]
    assert ("prefill", True) in health
    assert all(p["running"] == 0 and p["router_in_flight"] == 0
               for p in view if p["healthy"] and p["pool"] == "decode")
