"""2 prefill + 2 decode pods under 64 concurrent streaming requests.

Every request completes with a finish reason and transformers' greedy tokens, and afterwards
``GET /pools`` shows every decode pod's free KV blocks back at their value before the load.
Concurrent requests are spread over both decode pods.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import POD_ARGS, Stack, start_stack, stream_greedy_ids
from hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(300)

REQUESTS = 64
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def stack_2p2d(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-2p2d"),
                     "--prefill", "2", "--decode", "2", "--pod-args", POD_ARGS) as s:
        yield s


def _prompts() -> list[list[int]]:
    # 16 token-id prompts of 3 to 60 tokens (some fit one KV block, some span four), each
    # sent 4 times: the references stay cheap and equal prompts run side by side
    rng = random.Random(4)
    unique = [[rng.randrange(3, 2000) for _ in range(rng.randint(3, 60))] for _ in range(16)]
    return [unique[i % len(unique)] for i in range(REQUESTS)]


async def _load(stack: Stack, prompts: list[list[int]]) -> list[tuple[list[int], str | None]]:
    async with stack.async_client() as client:
        return await asyncio.gather(*(stream_greedy_ids(stack, client, p, MAX_TOKENS)
                                      for p in prompts))


def test_64_concurrent_streams_complete_and_free_every_block(stack_2p2d: Stack) -> None:
    stack = stack_2p2d
    pods = stack.pools()["pods"]
    assert sorted(p["pool"] for p in pods) == ["decode", "decode", "prefill", "prefill"]
    assert all(p["healthy"] for p in pods), pods
    before = stack.decode_free_blocks()
    prompts = _prompts()

    started = time.monotonic()
    results = asyncio.run(_load(stack, prompts))
    elapsed = time.monotonic() - started

    assert all(finish == "length" for _, finish in results), [f for _, f in results]
    unique = prompts[:16]
    refs = dict(zip(map(tuple, unique), hf_greedy(stack.model_dir, unique, MAX_TOKENS),
                    strict=True))
    want = [refs[tuple(p)] for p in prompts]
    wrong = [i for i, ((got, _), ref) in enumerate(zip(results, want, strict=False)) if got != ref]
    assert not wrong, f"{len(wrong)} of {REQUESTS} requests differ from transformers: {wrong}"

    after = stack.wait_decode_free(before, timeout=5.0)
    assert after == before, f"decode pods' free blocks {after} != before the load {before}"
    pods = stack.pools()["pods"]
    assert all(p["running"] == 0 and p["waiting"] == 0 for p in pods), pods
    print(f"{REQUESTS} streams of {MAX_TOKENS} tokens in {elapsed:.1f} s")


def test_concurrent_streams_are_spread_over_both_decode_pods(stack_2p2d: Stack) -> None:
    stack = stack_2p2d
    before = stack.decode_free_blocks()

    def started_per_pod() -> dict[str, float]:
        # every Generate a decode pod runs records where its prompt was prefilled
        return {p["address"]: sum(stack.pod_metric(p, "pdserve:prefill_decisions_total",
                                                   f'decision="{d}"')
                                  for d in ("remote", "local"))
                for p in stack.decode_pods()}

    started_before = started_per_pod()

    async def run() -> None:
        async with stack.async_client() as client:
            # long and heavy (two sequences, logprobs), and all four start together (one
            # after another, the first could end before the last began)
            streams = await asyncio.gather(*(client.completions.create(
                model=stack.model, prompt=[5 + i] * 40, max_tokens=1900, temperature=0,
                n=2, logprobs=5, stream=True, extra_body={"ignore_eos": True})
                for i in range(4)))
            try:
                # every request has started generating
                await asyncio.gather(*(anext(aiter(stream)) for stream in streams))
            finally:
                for stream in streams:
                    await stream.close()

    asyncio.run(run())
    # The pods' own count of the requests they ran. Not the router's in-flight count at
    # the first chunk, nor the pods' polled load: a test client on two busy cores read its
    # first chunks up to two seconds late, after two of the streams had finished.
    started = started_per_pod()
    assert sorted(started[a] - started_before[a] for a in started) == [2, 2], started
    assert stack.wait_decode_free(before, timeout=2.0) == before
