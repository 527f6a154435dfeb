"""AsyncEngine: runs an LLMEngine on its own thread for the asyncio gRPC services.

The engine is single-threaded; everything that touches its state runs on the engine thread
as a command (a callable) taken between steps. Each request's outputs go to an asyncio queue
on the caller's loop. No lock is needed and a step never waits for the network.

This is the services' whole view of the engine: they never reach into its attributes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.errors import DuplicateRequestError, KVTransferError
from engine.external_kv import KVReceiverPort, KVSend, KVTierPort, RemotePlan
from engine.kv_layout import KVLayout, KVMemory
from engine.llm_engine import EngineLimits, LLMEngine, RequestOutput
from engine.requests import merge_outputs
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
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, defer_delivery: bool | None = None) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # request id -> where its outputs go instead of its queue once it runs steadily
        # (``tap``); read and written on the event loop's thread only
        self._taps: dict[str, Callable[[RequestOutput], None]] = {}
        # On a GPU a step's outputs go out once the next step is launched: the event loop
        # (gRPC, one message per step) then takes the GIL while the engine thread waits for
        # the device, not while it schedules and prepares the next step. On a CPU the
        # forward is done when execute returns, so deferring would only add a step of
        # latency; and with async scheduling a step returns with the next one's work on
        # the device already, its outputs built from the step before. (None: decide.)
        self._defer = (engine.runner.device.type == "cuda" and not engine.async_scheduling
                       if defer_delivery is None else defer_delivery)
        self._pending: list[tuple[str, RequestOutput | BaseException]] = []
        # Deferred, a step's outputs are even built (collect_outputs: a Python pass over the
        # batch) only at the next launch, while the device runs; True while they wait.
        self._uncollected = False
        if self._defer:
            engine.after_launch = self._deliver_pending
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        device = self.engine.runner.device
        if device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(device)
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._deliver_pending()  # no next step to wait for
            ran = self._run_commands(block=not self.engine.has_work())
            self._deliver([(rid, KVTransferError(
                f"request {rid}: its KV did not arrive before the deadline"))
                for rid in self.engine.housekeeping()])
            # Outputs a command produced (a remote prefill's first token) go out now, not
            # after the next forward: that would add a decode step to the time to first token.
            if ran or not self._uncollected:
                self._deliver([(out.request_id, out) for out in self.engine.collect_outputs()])
            if not self.engine.has_work():
                continue
            steps = self.engine.num_steps
            try:
                outputs = self.engine.step(collect=not self._defer)
            except Exception as exc:  # a bug must fail the requests, not hang them
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            # a request the step could not compute ends with its error; the rest go on
            items: list[tuple[str, RequestOutput | BaseException]] = [
                *self.engine.take_failures(), *((out.request_id, out) for out in outputs)]
            launched = self.engine.num_steps != steps  # a batch ran: a next one may follow
            if self._defer and launched and not self.engine.tier_stores_queued():
                self._pending += items  # out at the next step's launch (or when idle)
                self._uncollected = True
            else:
                if self._defer:
                    items += [(out.request_id, out) for out in self.engine.collect_outputs()]
                self._deliver(items)
            # the step's new prompt chunks go to the KV tier only now: never before a first
            # token (the copy is the engine's; the writes run on the tier's threads)
            self.engine.flush_tier_stores()

    def _run_commands(self, block: bool) -> bool:
        """Run the queued commands; False when there were none."""
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return False
        # A command may end a request (abort, a stop string): its outputs so far first.
        self._collect_deferred()
        while True:
            try:
                cmd()
            except Exception:  # commands report their own errors; never kill the thread
                log.exception("engine command failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _collect_deferred(self) -> None:
        if self._uncollected:
            self._uncollected = False
            self._pending += [(out.request_id, out) for out in self.engine.collect_outputs()]

    def _deliver_pending(self) -> None:
        self._collect_deferred()
        items, self._pending = self._pending, []
        self._send(items)

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand outputs (or errors) to their streams now, after any still pending, so that
        a request's outputs stay in order."""
        if items:
            self._collect_deferred()
            items, self._pending = [*self._pending, *items], []
            self._send(items)

    def _send(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """One wake-up per event loop, not one per request (each call_soon_threadsafe
        writes to the loop's self-pipe, which cost an eighth of the engine thread at 16
        streams)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is None:
                continue
            loop, q = entry
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(request_id, None)
            by_loop.setdefault(loop, []).append((request_id, q, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(self._put_all, batch)

    def _put_all(self, batch: list[tuple[str, asyncio.Queue, Any]]) -> None:
        """On the event loop: each output to its request's tap or queue. A request's last
        output and errors always go to its queue, so its consumer sees how it ended."""
        for request_id, q, item in batch:
            tap = self._taps.get(request_id)
            if tap is not None and isinstance(item, RequestOutput) and not item.finished:
                tap(item)
            else:
                q.put_nowait(item)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
        self._deliver([(rid, exc) for rid in self._streams])

    # -- caller side (any asyncio loop) -------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result: Any = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(run)
        return await fut

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:  # the running request's stream stays as it is
            raise DuplicateRequestError(f"request id {request_id!r} is already running",
                                        param="request_id")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    async def _drain(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await q.get()
                # Outputs that queued up while this stream was busy go out as one: under
                # load, fewer messages is less work for the thread that is behind.
                while not isinstance(item, BaseException) and not item.finished and q.qsize():
                    later = q.get_nowait()
                    if isinstance(later, BaseException):
                        yield item
                        item = later
                    else:
                        item = merge_outputs(item, later)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # finish, cancel, disconnect or error: free the request's blocks (idempotent)
            self._streams.pop(request_id, None)
            self._taps.pop(request_id, None)
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
                      kv_send: KVSend | None) -> RequestOutput:
        """A prefill pod's request: returns the first token(s) once they are sampled."""
        first: RequestOutput | None = None
        async for out in self.generate(request_id, prompt, params, prefill_only=True,
                                       kv_send=kv_send):
            if first is None:
                first = out
            else:
                first.deltas += out.deltas
        assert first is not None
        return first

    async def reserve_remote(self, request_id: str, prompt: list[int], params: SamplingParams,
                             timeout_s: float, transfer_id: str | None = None
                             ) -> tuple[RemotePlan, asyncio.Queue]:
        """Reserve blocks for a remote prefill (LLMEngine.reserve_remote); returns the plan
        and the request's output queue, to pass to ``complete_remote``."""
        q = self._open_stream(request_id)
        try:
            plan = await self.call(lambda: self.engine.reserve_remote(
                request_id, prompt, params, timeout_s=timeout_s, transfer_id=transfer_id))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return plan, q

    async def complete_remote(self, request_id: str, q: asyncio.Queue, first_tokens: list[int],
                              first_logprobs: list[TokenLogprob | None],
                              num_cached_tokens: int = 0
                              ) -> AsyncGenerator[RequestOutput, None]:
        await self.call(lambda: self.engine.complete_remote(
            request_id, first_tokens, first_logprobs, num_cached_tokens))
        async for out in self._drain(request_id, q):
            yield out

    async def cached_prefix_tokens(self, prompt: list[int], cache_salt: str | None = None
                                   ) -> int:
        return await self.call(lambda: self.engine.cached_prefix_tokens(prompt, cache_salt))

    def attach_kv_tier(self, port: KVTierPort, timeout_s: float) -> None:
        """The pod's shared KV tier; its finished look-ups and loads wake the engine loop."""
        def wake() -> None:
            self._commands.put(_nothing)

        self._commands.put(lambda: self.engine.attach_kv_tier(port, timeout_s, wake))

    def attach_kv_receiver(self, receiver: KVReceiverPort) -> None:
        self._commands.put(lambda: self.engine.attach_kv_receiver(receiver))

    @property
    def layout(self) -> KVLayout:
        return self.engine.layout

    @property
    def kv_memory(self) -> KVMemory:
        return self.engine.kv_memory

    @property
    def limits(self) -> EngineLimits:
        return self.engine.limits

    def tap(self, request_id: str, tap: Callable[[RequestOutput], None]) -> bool:
        """From now on hand the request's outputs, all but its last, straight to ``tap`` on
        the event loop instead of waking the request's reader for each: a decode pod's
        shared stream writes a running request's tokens this way, one step of every
        request in one callback. Only while nothing is queued for the reader (outputs stay
        in order); returns whether it took. Call on the request's event loop."""
        entry = self._streams.get(request_id)
        if entry is None or entry[1].qsize():
            return False
        self._taps[request_id] = tap
        return True

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._taps.pop(request_id, None)
        await self.call(lambda: self.engine.abort(request_id))

    def load(self) -> LoadSnapshot:
        e = self.engine  # plain int reads: safe without the engine thread
        return LoadSnapshot(len(e.requests), len(e.scheduler.waiting), e.pool.num_free,
                            e.pool.num_blocks, e.pool.stats.queried_tokens,
                            e.pool.stats.hit_tokens, e.scheduler.num_preemptions)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _nothing() -> None:
    """A command that only wakes the engine loop."""


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
