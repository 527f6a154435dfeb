"""AsyncEngine: runs an LLMEngine on its own thread for the asyncio gRPC services.

The engine is single-threaded; everything that touches its state runs on the engine thread
as a command (a callable) taken between steps. Each request's outputs go to an asyncio queue
on the caller's loop. No lock is needed and a step never waits for the network.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.llm_engine import KVSink, LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob

T = TypeVar("T")
log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05


@dataclass(slots=True)
class LoadSnapshot:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_work())
            # Outputs a command produced (a remote prefill's first token) go out now, not
            # after the next forward: that would add a decode step to the time to first token.
            for out in self.engine.collect_outputs():
                self._deliver(out.request_id, out)
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must fail the requests, not hang them
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _run_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                cmd()
            except Exception:  # commands report their own errors; never kill the thread
                log.exception("engine command failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, q = entry
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._deliver(rid, exc)

    # -- caller side (any asyncio loop) -------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result: Any = fn()
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(run)
        return await fut

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    async def _drain(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # finish, cancel, disconnect or error: free the request's blocks (idempotent)
            self._streams.pop(request_id, None)
            self._commands.put(lambda: self.engine.abort(request_id))

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        """Add a request (engine.add_request kwargs pass through) and stream its outputs."""
        q = self._open_stream(request_id)
        try:
            await self.call(lambda: self.engine.add_request(request_id, prompt, params, **kwargs))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        async for out in self._drain(request_id, q):
            yield out

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                      kv_sink: KVSink | None) -> RequestOutput:
        """A prefill pod's request: returns the first token(s) once they are sampled."""
        first: RequestOutput | None = None
        async for out in self.generate(request_id, prompt, params, prefill_only=True,
                                       kv_sink=kv_sink):
            if first is None:
                first = out
            else:
                first.deltas += out.deltas
        assert first is not None
        return first

    async def reserve_remote(self, request_id: str, prompt: list[int], params: SamplingParams
                             ) -> tuple[list[int], int, asyncio.Queue]:
        """Reserve blocks for a remote prefill; returns (block ids, seed, output queue)."""
        q = self._open_stream(request_id)

        def reserve() -> tuple[list[int], int]:
            blocks = self.engine.reserve_remote(request_id, prompt, params)
            return blocks, self.engine.seed_of(request_id)

        try:
            blocks, seed = await self.call(reserve)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return blocks, seed, q

    async def complete_remote(self, request_id: str, q: asyncio.Queue, first_tokens: list[int],
                              first_logprobs: list[TokenLogprob | None],
                              num_cached_tokens: int = 0
                              ) -> AsyncGenerator[RequestOutput, None]:
        await self.call(lambda: self.engine.complete_remote(
            request_id, first_tokens, first_logprobs, num_cached_tokens))
        async for out in self._drain(request_id, q):
            yield out

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        await self.call(lambda: self.engine.abort(request_id))

    def load(self) -> LoadSnapshot:
        e = self.engine  # plain int reads: safe without the engine thread
        return LoadSnapshot(len(e.requests), len(e.scheduler.waiting), e.pool.num_free,
                            e.pool.num_blocks)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
