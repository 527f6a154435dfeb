"""`pdserve up` supervises its pods: kill -9 of a decode pod and of a prefill pod (issue 11).

1 prefill + 2 decode pods. Killing a decode pod ends its in-flight streams with a clean
error within 5 s while the other decode pod's streams complete exactly; killing the prefill
pod lets every in-flight stream complete. Either way, requests sent 1 s after the kill get
transformers' greedy tokens (the router skips the dead decode pod; decode pods prefill
locally without a prefill pod), `up` restarts the dead pod on its port within 30 s, the
pod takes traffic again, and no KV block stays held on any pod afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import POD_ARGS, Stack, extra, start_stack
from hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(300)

POD_LINE = re.compile(r"pdserve up: (\w+-\d+) \(pid (\d+)\) on (\S+)")
LONG = 1900  # tokens: streams still running when the pod is killed (seconds of decode)
CHECKED = 64  # of a long stream, the tokens compared with transformers (the cost of HF)
SHORT = 12
PROMPTS = [[11 + i, 200 + i, 37, 5 * i + 3, 99] for i in range(4)]


@pytest.fixture(scope="module")
def fleet(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-fleet"),
                     "--prefill", "1", "--decode", "2", "--pod-args", POD_ARGS,
                     "--restart-backoff", "0.2",
                     # spread concurrent streams evenly: some are on the pod that is killed
                     "--router-args", "--routing least-loaded") as s:
        yield s


def _pids(stack: Stack) -> dict[str, tuple[int, str]]:
    """Each pod's latest (pid, address), from `up`'s log."""
    found: dict[str, tuple[int, str]] = {}
    for name, pid, address in POD_LINE.findall(stack.log_tail(1 << 20)):
        found[name] = (int(pid), address)
    return found


async def _stream(client: Any, stack: Stack, prompt: list[int], max_tokens: int,
                  started: asyncio.Event | None = None
                  ) -> tuple[list[int], str | None, float | None]:
    """(token ids, finish reason, time.monotonic() it failed at, or None)."""
    ids: list[int] = []
    finish = None
    try:
        stream = await client.completions.create(
            model=stack.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            for choice in chunk.choices:
                ids += extra(choice, "token_ids") or []
                finish = choice.finish_reason or finish
            if started is not None and ids:
                started.set()
    except Exception:
        return ids, None, time.monotonic()
    return ids, finish, None


def _busiest_decode_pod(stack: Stack) -> str:
    """The name of the decode pod with the most requests in flight (the router's count)."""
    in_flight = {p["address"]: p["router_in_flight"] for p in stack.decode_pods()}
    names = {address: name for name, (_, address) in _pids(stack).items()
             if name.startswith("decode-")}
    return names[max(in_flight, key=lambda a: in_flight[a])]


async def _kill_during_streams(stack: Stack, pod: str | None) -> tuple[list[tuple], float, str]:
    """Start 4 long streams, kill -9 ``pod`` (None: the decode pod holding the most of them)
    once all are streaming; their results, the time of the kill and the pod killed."""
    async with stack.async_client() as client:
        events = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(_stream(client, stack, p, LONG, e))
                 for p, e in zip(PROMPTS, events, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        if pod is None:
            pod = await asyncio.to_thread(_busiest_decode_pod, stack)
        os.kill(_pids(stack)[pod][0], signal.SIGKILL)
        killed = time.monotonic()
        return list(await asyncio.gather(*tasks)), killed, pod


async def _short_requests(stack: Stack) -> list[tuple]:
    async with stack.async_client() as client:
        return list(await asyncio.gather(*(_stream(client, stack, p, SHORT) for p in PROMPTS)))


def _wait_back(stack: Stack, pod: str, old_pid: int, timeout: float) -> float:
    """Waits until ``up`` reports ``pod`` ready again (a new pid) and /pools sees it
    healthy; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pid, address = _pids(stack).get(pod, (old_pid, ""))
        if pid != old_pid and any(p["address"] == address and p["healthy"]
                                  for p in stack.pools()["pods"]):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{pod} not back after {timeout} s:\n{stack.log_tail()}")


def _idle_everywhere(stack: Stack) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        pods = stack.pools()["pods"]
        if all(p["free_blocks"] == p["total_blocks"] and p["running"] == 0 for p in pods) \
                or time.monotonic() > deadline:
            return pods
        time.sleep(0.1)


def test_a_killed_decode_pod_fails_only_its_streams_and_comes_back(fleet: Stack) -> None:
    stack = fleet
    want_long = hf_greedy(stack.model_dir, PROMPTS, CHECKED)
    want_short = [w[:SHORT] for w in want_long]
    before = _pids(stack)
    # the pod that holds the most streams (a pod whose streams all ended before the kill
    # would show nothing)
    results, killed, victim = asyncio.run(_kill_during_streams(stack, None))
    old_pid, address = before[victim]
    failed = [r for r in results if r[2] is not None]
    assert failed, "no stream was on the killed pod"
    assert all(r[2] - killed < 5 for r in failed), [r[2] - killed for r in failed]
    print(f"{len(failed)} stream(s) on the killed pod ended with an error "
          f"{max(r[2] - killed for r in failed):.2f} s after the kill")
    for (ids, finish, failed_at), want in zip(results, want_long, strict=True):
        if failed_at is None:  # on the surviving pod: complete and exact
            assert finish == "length" and len(ids) == LONG and ids[:CHECKED] == want
        else:  # what it got before the kill was exact
            assert len(ids) < LONG and ids[:CHECKED] == want[:len(ids)]
    time.sleep(max(0.0, killed + 1 - time.monotonic()))
    after = asyncio.run(_short_requests(stack))
    assert [(ids, finish) for ids, finish, _ in after] == [(w, "length") for w in want_short]
    _wait_back(stack, victim, old_pid, 30)
    print(f"{victim} back (healthy in /pools) {time.monotonic() - killed:.1f} s after the kill")
    # it takes traffic: a fresh process, so every request its counter shows is new
    results, _ = asyncio.run(_streams_and_pools(stack))
    assert all(r[1] == "length" and r[0][:CHECKED] == w
               for r, w in zip(results[0], want_long, strict=True))
    (back,) = [p for p in stack.decode_pods() if p["address"] == address]
    assert stack.pod_metric(back, "pdserve:requests_total", 'outcome="ok",role="decode"') > 0
    pods = _idle_everywhere(stack)
    assert all(p["free_blocks"] == p["total_blocks"] for p in pods), pods
    assert _pids(stack)[victim][1] == address  # on its port again


async def _streams_and_pools(stack: Stack) -> tuple[tuple[list, list[dict]], None]:
    async with stack.async_client() as client:
        events = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(_stream(client, stack, p, LONG, e))
                 for p, e in zip(PROMPTS, events, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        during = await asyncio.to_thread(stack.decode_pods)
        return (list(await asyncio.gather(*tasks)), during), None


def test_a_killed_prefill_pod_lets_streams_complete_and_comes_back(fleet: Stack) -> None:
    stack = fleet
    want_long = hf_greedy(stack.model_dir, PROMPTS, CHECKED)
    old_pid, _ = _pids(stack)["prefill-0"]
    results, killed, _ = asyncio.run(_kill_during_streams(stack, "prefill-0"))
    assert [(ids[:CHECKED], len(ids), finish) for ids, finish, _ in results] == [
        (w, LONG, "length") for w in want_long]
    time.sleep(max(0.0, killed + 1 - time.monotonic()))
    fresh = [[p[0] + 1000, *p[1:]] for p in PROMPTS]  # nothing cached: a real prefill
    after = asyncio.run(_short_requests_of(stack, fresh))
    assert [(ids, finish) for ids, finish, _ in after] == [
        (w, "length") for w in hf_greedy(stack.model_dir, fresh, SHORT)]
    _wait_back(stack, "prefill-0", old_pid, 30)
    print(f"prefill-0 back (healthy in /pools) {time.monotonic() - killed:.1f} s after the kill")
    pods = stack.decode_pods()
    moved = sum(stack.pod_metric(p, "pdserve:kv_transfer_blocks_total", 'role="decode"')
                for p in pods)
    again = [[p[0] + 1500, *p[1:]] for p in PROMPTS]
    after = asyncio.run(_short_requests_of(stack, again))
    assert [(ids, finish) for ids, finish, _ in after] == [
        (w, "length") for w in hf_greedy(stack.model_dir, again, SHORT)]
    moved_after = sum(stack.pod_metric(p, "pdserve:kv_transfer_blocks_total", 'role="decode"')
                      for p in pods)
    assert moved_after > moved  # the restarted prefill pod computed and sent KV again
    pods = _idle_everywhere(stack)
    assert all(p["free_blocks"] == p["total_blocks"] for p in pods), pods


async def _short_requests_of(stack: Stack, prompts: list[list[int]]) -> list[tuple]:
    async with stack.async_client() as client:
        return list(await asyncio.gather(*(_stream(client, stack, p, SHORT) for p in prompts)))
