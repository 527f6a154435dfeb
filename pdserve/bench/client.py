"""The measuring client: OpenAI streaming ``/v1/completions``, timed per request.

Per request, at the client, from the moment it is sent: TTFT is the time to the first chunk
carrying a token; ITL is the gap between token-carrying chunks (vLLM's definition); TPOT is
(end-to-end - TTFT) / (output tokens - 1). Chunks' token counts come from
``return_token_ids`` (pdserve and vLLM send them); a server that does not send them is
counted one token per chunk with text.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import httpx

from pdserve.bench.workload import WorkItem

REQUEST_TIMEOUT_S = 600.0


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    ok: bool = False
    error: str = ""
    sent_at: float = 0.0  # seconds after the run's start
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    first_chunk_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    turn: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    """The server under test."""

    url: str  # base URL, no /v1
    model: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def send_one(client: httpx.AsyncClient, target: Target, item: WorkItem,
                   history: list[int] | None = None, t0: float = 0.0) -> RequestResult:
    prompt = (history or []) + item.prompt
    res = RequestResult(prompt_len=len(prompt))
    body = {"model": target.model, "prompt": prompt, "max_tokens": item.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    res.sent_at = start - t0
    try:
        async with client.stream("POST", f"{target.url}/v1/completions", json=body,
                                 headers=target.headers()) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            usage_tokens = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                ids = [t for c in choices for t in c.get("token_ids") or []]
                n = len(ids) or sum(1 for c in choices if c.get("text"))
                if n == 0:
                    continue
                res.output_ids += ids
                now = time.perf_counter()
                if res.output_tokens == 0:
                    res.ttft, res.first_chunk_tokens = now - start, n
                else:
                    res.itls.append(now - last)
                last = now
                res.output_tokens += n
            res.e2e = time.perf_counter() - start
            if usage_tokens is not None and usage_tokens != res.output_tokens:
                if not res.output_ids:  # counted chunks, not tokens: usage is the truth
                    res.output_tokens = usage_tokens
                else:
                    res.error = (f"streamed {res.output_tokens} tokens but usage says "
                                 f"{usage_tokens}")
                    return res
            if res.output_tokens != item.max_tokens:
                res.error = f"got {res.output_tokens} tokens, asked {item.max_tokens}"
            else:
                res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


class _Progress:
    """A tqdm bar on stderr when asked for (and quiet otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_workload(target: Target, items: list[WorkItem], concurrency: int,
                       progress: str = "") -> tuple[list[RequestResult], float]:
    """Send ``items`` at their ``send_at`` (at most ``concurrency`` in flight); returns the
    results in item order and the run's wall time. ``progress``: a bar label ("" for none)."""
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    bar = _Progress(len(items), progress, bool(progress))
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(item: WorkItem) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + item.send_at - time.perf_counter()))
            async with limit:
                res = await send_one(client, target, item, t0=t0)
            bar.step()
            return res

        async def session(turns: list[WorkItem]) -> list[RequestResult]:
            """One conversation: each turn after the last one ended, on top of it."""
            await asyncio.sleep(max(0.0, t0 + turns[0].send_at - time.perf_counter()))
            history: list[int] = []
            out = []
            for k, item in enumerate(turns):
                async with limit:
                    res = await send_one(client, target, item, history, t0)
                bar.step()
                res.turn = k
                out.append(res)
                if not res.ok:
                    break
                history = history + item.prompt + res.output_ids
            return out

        sessions: dict[int, list[WorkItem]] = {}
        for item in items:
            if item.session is not None:
                sessions.setdefault(item.session, []).append(item)
        try:
            if sessions:
                grouped = await asyncio.gather(*(session(t) for t in sessions.values()))
                results = [r for group in grouped for r in group]
            else:
                results = list(await asyncio.gather(*(one(i) for i in items)))
        finally:
            bar.close()
        return results, time.perf_counter() - t0


async def served_model(url: str, api_key: str | None = None) -> tuple[str, str]:
    """(id, root) of the first model the server lists; root is its directory when vLLM-like."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.get(f"{url}/v1/models", headers=headers)
        reply.raise_for_status()
        first = reply.json()["data"][0]
        return first["id"], first.get("root") or first["id"]
