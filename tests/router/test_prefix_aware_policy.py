"""``router.policy.PrefixAware`` over plain ``Pools`` (no network): the same prompt prefix
goes back to the pod it was sent to, new prefixes spread, salts are part of the key, short
prompts and an overloaded pod fall back to least-loaded, a pod that leaves is forgotten."""

from __future__ import annotations

import random

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from router.policy import LeastLoaded, PrefixAware, RouteRequest, make_policy
from router.pools import Pod, Pools, Role


def pod(role: Role, name: str, **report: int) -> Pod:
    return Pod(role, name, channel=None, stub=None, health=None, healthy=True,
               report=pb.LoadReport(block_size=16, **report))


def prompt(seed: int, n: int = 1024) -> list[int]:
    return random.Random(seed).choices(range(32000), k=n)


def pools() -> Pools:
    return Pools([pod(Role.PREFILL, "p0"), pod(Role.PREFILL, "p1"),
                  pod(Role.DECODE, "d0", free_blocks=100),
                  pod(Role.DECODE, "d1", free_blocks=100)])


def test_a_prefix_returns_to_its_pod_and_new_prefixes_spread() -> None:
    policy = PrefixAware(pools(), model_id="m")
    first = {i: policy.pick_prefill(RouteRequest(prompt(i))) for i in range(4)}
    assert sorted(p.address for p in first.values()) == ["p0", "p0", "p1", "p1"]
    for i in (3, 0, 2, 1, 0):
        again = policy.pick_prefill(RouteRequest([*prompt(i)[:900], 5, 6, 7]))
        assert again is first[i]


def test_the_salt_is_part_of_the_prefix() -> None:
    policy = PrefixAware(pools(), model_id="m")
    a = policy.pick_prefill(RouteRequest(prompt(1), cache_salt="a"))
    b = policy.pick_prefill(RouteRequest(prompt(1), cache_salt="b"))
    assert a is not b  # new to every pod: it goes to the one that knows less
    assert policy.prefill.matched_chunks(a.address, policy._chunks(
        RouteRequest(prompt(1), cache_salt="b"))) == 0


def test_short_prompts_and_imbalance_fall_back_to_least_loaded() -> None:
    p = Pools([pod(Role.PREFILL, "busy", outstanding_prefill_tokens=50_000),
               pod(Role.PREFILL, "idle")])
    policy = PrefixAware(p, model_id="m")
    policy.prefill.record("busy", policy._chunks(RouteRequest(prompt(1))))
    assert policy.pick_prefill(RouteRequest(prompt(1))).address == "idle"  # overloaded
    assert policy.pick_prefill(RouteRequest([1, 2, 3])).address == "idle"  # no chunk


def test_a_pod_that_leaves_is_forgotten_and_policies_are_chosen_by_name() -> None:
    p = pools()
    policy = make_policy("prefix", p, "m")
    assert isinstance(policy, PrefixAware)
    chosen = policy.pick_decode(RouteRequest(prompt(2)))
    assert policy.decode.known_chunks(chosen.address) == 4
    for callback in p.on_leave:
        callback(chosen)
    assert policy.decode.known_chunks(chosen.address) == 0
    assert type(make_policy("least-loaded", p, "m")) is LeastLoaded
    with pytest.raises(ValueError):
        make_policy("random", p, "m")


def test_an_empty_cache_salt_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(cache_salt="")
    assert caught.value.param == "cache_salt"
