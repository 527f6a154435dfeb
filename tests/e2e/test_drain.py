"""Graceful termination of a decode pod, as Kubernetes does it: SIGTERM, then the grace period.

Under ``pdserve up --decode 2``, eight long generations run over both decode pods; the one
running more of them gets SIGTERM mid-way. It must report NOT_SERVING, refuse new work (the
router sends it elsewhere), finish every generation it was running, and exit well within its
grace period.

The long requests are not streamed to the test: each is a streamed gRPC ``Generate`` between
router and pod all the same (what the drain is about), and a test client parsing eight SSE
streams on two shared cores fell seconds behind the pods, so it sent the SIGTERM after the
victim had already finished.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_helpers import Stack, start_stack

pytestmark = pytest.mark.timeout(240)

DRAIN_TIMEOUT_S = 60.0
STREAMS = 8
NEW_REQUESTS = 4
# Nearly all of the model's 2,048-token context, on a model four times the default's size:
# many seconds of decoding at batch 4 on 2 shared cores, so the SIGTERM and the new requests
# land while the generations run, and well within the drain timeout.
MAX_TOKENS = 1900
POD_LINE = re.compile(r"pdserve up: (decode-\d+) \(pid (\d+)\) on (\S+)")
ACCESS_LINE = re.compile(
    r" access \S+ ok prompt_tokens=\d+ completion_tokens=(\d+) .* pods=([^<\s]+)<-")


async def _long_request(stack: Stack, i: int) -> tuple[int, str | None]:
    """(completion tokens, finish reason) of one long greedy generation."""
    reply = await stack.async_client().completions.create(
        model=stack.model, prompt=f"def handler_{i}(request):\n", max_tokens=MAX_TOKENS,
        temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage is not None
    return reply.usage.completion_tokens, reply.choices[0].finish_reason


def _decode_pids(stack: Stack) -> dict[str, int]:
    """address -> pid of each decode pod, from pdserve up's own lines."""
    return {m.group(3): int(m.group(2)) for m in POD_LINE.finditer(stack.log_tail(1 << 20))}


def _ok_count(stack: Stack, pod: dict) -> float:
    return stack.pod_metric(pod, "pdserve:requests_total", 'outcome="ok",role="decode"')


def _served_on(log: str) -> dict[int, list[str]]:
    """completion tokens -> the decode pod of each request that ended with that many, from
    the router's access log (``pods=DECODE<-PREFILL``)."""
    served: dict[int, list[str]] = {}
    for tokens, pod in ACCESS_LINE.findall(log):
        served.setdefault(int(tokens), []).append(pod)
    return served


def _running(stack: Stack, pod: dict) -> int:
    return int(stack.pod_metric(pod, "vllm:num_requests_running"))


def test_sigterm_drains_a_decode_pod_while_the_other_takes_new_work(
        model_factory: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = model_factory(layers=4, hidden=128)
    with start_stack(model_dir, tmp_path, "--prefill", "1", "--decode", "2",
                     "--drain-timeout", str(DRAIN_TIMEOUT_S),
                     "--pod-args", "--num-kv-blocks 1024") as stack:
        asyncio.run(_drain_scenario(stack))


async def _warm_up(stack: Stack) -> None:
    """A first request on each decode pod (its first steps are slow), so the eight generations
    start together and spread over both."""
    client = stack.async_client()
    for _ in range(5):
        await asyncio.gather(*(client.completions.create(
            model=stack.model, prompt=f"warm {i}", max_tokens=2) for i in range(4)))
        pods = await asyncio.to_thread(stack.decode_pods)
        counts = [await asyncio.to_thread(_ok_count, stack, p) for p in pods]
        if all(c >= 1 for c in counts):
            return
    raise AssertionError(f"requests did not reach both decode pods: {counts}")


async def _drain_scenario(stack: Stack) -> None:
    pids = _decode_pids(stack)
    assert len(pids) == 2, stack.log_tail()
    await _warm_up(stack)
    tasks = [asyncio.create_task(_long_request(stack, i)) for i in range(STREAMS)]
    pods = {p["address"]: p for p in await asyncio.to_thread(stack.decode_pods)}
    deadline = time.monotonic() + 60
    while True:  # until every generation runs in a pod's engine (not only at the router)
        running = {a: await asyncio.to_thread(_running, stack, p) for a, p in pods.items()}
        if sum(running.values()) == STREAMS:
            break
        assert time.monotonic() < deadline, f"generations did not start: {running}"
        assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
        await asyncio.sleep(0.02)
    victim = max(running, key=lambda a: running[a])
    (other,) = [a for a in pods if a != victim]

    killed_at = time.monotonic()
    os.kill(pids[victim], signal.SIGTERM)
    # The pod handles the signal on its event loop, which a loaded machine may reach only
    # after requests sent at once had landed there (and were served, rightly, as work that
    # came before the drain): wait for the pod to say it drains -- from then on it refuses
    # new work -- and send the new work right away, before the router's next poll can
    # have seen NOT_SERVING: the draining pod refuses what lands there and the router
    # retries on the other one.
    while "draining: " not in stack.log_tail(1 << 20):
        assert time.monotonic() - killed_at < DRAIN_TIMEOUT_S, "the pod never began to drain"
        await asyncio.sleep(0.005)
    client = stack.async_client()
    new = await asyncio.gather(*(client.completions.create(
        model=stack.model, prompt=f"x = {i}\n", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True}) for i in range(NEW_REQUESTS)))
    assert all(r.choices[0].finish_reason == "length" for r in new)

    done = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    # every generation ran to its end, those on the draining pod included
    assert done == [(MAX_TOKENS, "length")] * STREAMS, done

    exited = re.compile(rf"pdserve up: decode-\d+ \(pid {pids[victim]}\) drained and exited")
    while not exited.search(stack.log_tail(1 << 20)):
        assert time.monotonic() - killed_at < DRAIN_TIMEOUT_S, "the pod outlived its grace"
        await asyncio.sleep(0.05)
    # The pod's own lines come through pdserve up's relay thread: give them a moment.
    while "drained in" not in (log := stack.log_tail(1 << 20)):
        assert time.monotonic() - killed_at < DRAIN_TIMEOUT_S, log[-3000:]
        await asyncio.sleep(0.05)
    counts = [int(n) for n in re.findall(r"draining: (\d+) call\(s\) in flight", log)]
    assert counts and counts[0] >= 1, log[-3000:]  # it had work to finish, and did
    assert "drain cut short" not in log

    # The other pod served its own streams and every new request (the router's access log
    # names the decode pod of each); the router saw the victim say NOT_SERVING (or go away)
    # and uses it no more.
    deadline = time.monotonic() + 10  # the router writes a line as a request ends
    while len((served := _served_on(stack.log_tail(1 << 20))).get(MAX_TOKENS, [])) < STREAMS \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert sorted(served[MAX_TOKENS]) == sorted(
        [victim] * running[victim] + [other] * running[other]), (running, stack.log_tail(6000))
    assert served[8] == [other] * NEW_REQUESTS, (victim, other, stack.log_tail(6000))
    view = {p["address"]: p for p in await asyncio.to_thread(stack.decode_pods)}
    assert not view[victim]["healthy"] and view[other]["healthy"]
    more = await client.completions.create(model=stack.model, prompt="y", max_tokens=4)
    assert more.choices[0].finish_reason is not None
