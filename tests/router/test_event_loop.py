"""Large inputs are tokenized off the router's event loop: /health stays fast meanwhile.

Ten 1 MB prompts are sent at once; the router tokenizes each (about 0.5 M tokens, over a
second of work apiece here) before it finds them too long for the context. While it does,
/health must answer within 100 ms. The machine is shared (CI's 2 cores, other suites'
processes): a process preempted by the OS can miss any deadline, so the test allows 1 probe
in 100 over 100 ms (seen on a box at load 8: 0-1 in 1,500) but none over 500 ms. Without
the tokenizing processes, threads alone, 1-2 % of the probes took 100-420 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from router_helpers import RouterProcess, free_port, start_router

PROMPT = ("def hello_world(): return 'x' * 42 # comment\n" * 25_000)[:1_000_000]
HEALTH_LIMIT_S = 0.1
WORST_S = 0.5


@pytest.fixture(scope="module")
def router(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RouterProcess]:
    proc = start_router(tiny_model, [f"127.0.0.1:{free_port()}"],
                        tmp_path_factory.mktemp("router-loop"))
    yield proc
    proc.stop()


async def _health_while_tokenizing(url: str) -> tuple[list[float], list[httpx.Response]]:
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        big = [asyncio.create_task(client.post("/v1/completions",
                                               json={"prompt": PROMPT, "max_tokens": 1}))
               for _ in range(10)]
        await asyncio.sleep(0.3)  # the bodies are in; tokenizing has begun
        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as probe:
            while not all(t.done() for t in big):
                start = time.perf_counter()
                assert (await probe.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)
        return latencies, [t.result() for t in big]


def test_health_answers_fast_while_ten_1mb_prompts_are_tokenized(router: RouterProcess
                                                                 ) -> None:
    latencies, answers = asyncio.run(asyncio.wait_for(
        _health_while_tokenizing(router.url), timeout=180))
    for answer in answers:  # each was tokenized, then refused for its length
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "max_prompt_tokens"
    assert len(latencies) >= 10, latencies  # the tokenizing lasted long enough to probe
    latencies.sort()
    summary = (f"slowest /health {latencies[-1] * 1000:.0f} ms, median "
               f"{latencies[len(latencies) // 2] * 1000:.0f} ms over {len(latencies)} probes")
    assert latencies[int(len(latencies) * 0.99)] < HEALTH_LIMIT_S, summary
    assert latencies[-1] < WORST_S, summary
