"""The tier's small mechanisms on their own: the bytes-in-flight budget and the circuit
breaker that skips a down Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from kv_transfer.tier.budget import ByteBudget
from kv_transfer.tier.redis_level import CircuitBreaker, RedisTierConfig


def test_the_byte_budget_refuses_or_waits_and_wakes_on_release():
    async def run() -> None:
        budget = ByteBudget(100)
        assert budget.try_acquire(60) and not budget.try_acquire(50)
        with pytest.raises(TimeoutError):
            await budget.acquire(50, timeout=0.05)
        waiter = asyncio.ensure_future(budget.acquire(50, timeout=5))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        budget.release(60)
        await asyncio.wait_for(waiter, 1)
        assert budget.used == 50
        budget.release(50)
        # a reservation larger than the whole budget takes all of it and runs alone
        assert budget.try_acquire(1000) and budget.used == 100 and not budget.try_acquire(1)
        budget.release(1000)
        assert budget.used == 0

    asyncio.run(run())


def test_the_breaker_skips_for_a_doubling_backoff_and_lets_one_probe_through():
    breaker = CircuitBreaker(0.05, 0.15)
    assert breaker.allow()
    breaker.failure()
    assert breaker.is_open and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failure()  # the probe failed: now 0.1 s
    time.sleep(0.06)
    assert not breaker.allow()
    time.sleep(0.05)
    assert breaker.allow()
    breaker.abandon()  # the probe was cancelled: another may go
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


@pytest.mark.parametrize("url, extra, match", [
    ("http://127.0.0.1:6379", {}, "redis://"),
    ("127.0.0.1:6379", {}, "redis://"),
    ("redis://127.0.0.1:6379", {"ca_file": "ca.crt"}, "rediss://"),
    ("redis://127.0.0.1:6379", {"ttl_s": 0}, "ttl_s"),
])
def test_bad_tier_configurations_are_refused_with_a_clear_message(url, extra, match):
    with pytest.raises(ValueError, match=match):
        RedisTierConfig(url=url, **extra)
