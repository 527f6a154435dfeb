"""GenerateStream on a decode pod: many requests over one gRPC stream, one message per step.

A router sends every request it routes to this pod over one stream. Each request runs the
same code as its own ``Generate`` call would (``DecodeServicer.generate_one``) in a task of
its own; what the tasks yield goes to one outbox, and the stream writes whatever the outbox
holds as one ``StreamResponse``. The engine thread hands a step's outputs to the event loop
in one callback, so every request's tokens of that step are in the outbox before the writer
runs: one message per step instead of one per request. When the router reads slower than
the pod writes, items pile up and leave together -- fewer, larger messages, not a backlog of
small ones.

Per request, the contract is Generate's: its items are the responses Generate would stream,
then one ``end`` item with the status Generate would end with. Cancelling a request (a
``cancel`` id) or the whole stream aborts it on the engine and frees its blocks. Requests
count as the pod's work while it drains (``DrainGate.try_enter``); a request that arrives
once it drains ends at once with UNAVAILABLE, which the router retries elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from protos import pdserve_pb2 as pb
from protos.drain import DRAINING_MESSAGE, DrainGate

log = logging.getLogger(__name__)

# (request, its context) -> the responses Generate would stream
RunOne = Callable[[pb.GenerateRequest, "RequestContext"], AsyncIterator[pb.GenerateResponse]]


class RequestAborted(Exception):
    """A request of the stream ended with a status other than OK (``RequestContext.abort``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RequestContext:
    """The part of a call's context that Generate's code uses, for one request of a stream,
    and ``emit``: a response straight into the stream, in order after those yielded (for
    a running request's tokens, without waking its task; ``AsyncEngine.tap``)."""

    def __init__(self, metadata: dict[str, str],
                 emit: Callable[[pb.GenerateResponse], None]) -> None:
        self._metadata = tuple(metadata.items())
        self.emit = emit

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise RequestAborted(code, details)


class Outbox:
    """Items waiting to be written; ``take`` hands out all of them at once."""

    def __init__(self) -> None:
        self._items: list[pb.StreamItem] = []
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, item: pb.StreamItem) -> None:
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self) -> list[pb.StreamItem] | None:
        """Everything queued (waiting for at least one item); None once closed and empty."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        items, self._items = self._items, []
        return items


def _end(request_id: str, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = ""
         ) -> pb.StreamItem:
    return pb.StreamItem(request_id=request_id, end=True, code=code.value[0], details=details)


class RequestStream:
    """One GenerateStream call: its requests' tasks and its outbox."""

    def __init__(self, run_one: RunOne, gate: DrainGate,
                 is_running: Callable[[str], bool]) -> None:
        self._run_one = run_one
        self._gate = gate
        self._is_running = is_running  # a request id already running on this pod
        self._outbox = Outbox()
        self._tasks: dict[str, asyncio.Task] = {}
        self._reading = True

    async def serve(self, requests: AsyncIterator[pb.StreamRequest]
                    ) -> AsyncIterator[pb.StreamResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (items := await self._outbox.take()) is not None:
                yield pb.StreamResponse(items=items)
        finally:  # the router went away or cancelled the stream: abort what still runs
            reader.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        try:
            async for message in requests:
                for request_id in message.cancel:
                    task = self._tasks.get(request_id)
                    if task is not None:
                        task.cancel()
                for start in message.start:
                    self._start(start)
        except Exception as exc:  # the stream broke: serve() ends with it
            log.debug("GenerateStream: reading ended: %r", exc)
        finally:
            self._reading = False
            self._close_if_done()

    def _start(self, start: pb.GenerateStart) -> None:
        rid = start.request.request_id
        if not rid:  # its items could not be told apart from another's
            self._outbox.put(_end(rid, grpc.StatusCode.INVALID_ARGUMENT,
                                  "a request on GenerateStream needs a request_id"))
            return
        if rid in self._tasks or self._is_running(rid):
            self._outbox.put(_end(rid, grpc.StatusCode.ALREADY_EXISTS,
                                  f"request id {rid!r} is already running on this pod"))
            return
        if not self._gate.try_enter():
            self._outbox.put(_end(rid, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE))
            return
        task = asyncio.create_task(self._one(start))
        self._tasks[rid] = task
        task.add_done_callback(functools.partial(self._done, rid))

    def _done(self, rid: str, _task: asyncio.Task) -> None:
        self._tasks.pop(rid, None)
        self._gate.leave()
        self._close_if_done()

    def _close_if_done(self) -> None:
        if not self._reading and not self._tasks:
            self._outbox.close()

    def _emit(self, rid: str, response: pb.GenerateResponse) -> None:
        self._outbox.put(pb.StreamItem(request_id=rid, response=response))

    async def _one(self, start: pb.GenerateStart) -> None:
        rid = start.request.request_id
        context = RequestContext(dict(start.metadata), functools.partial(self._emit, rid))
        try:
            async for response in self._run_one(start.request, context):
                self._emit(rid, response)
        except RequestAborted as exc:
            self._outbox.put(_end(rid, exc.code, exc.details))
        except asyncio.CancelledError:
            raise  # cancelled by the router (or the stream's end): nobody is waiting
        except Exception:
            log.exception("request %s failed", rid)
            self._outbox.put(_end(rid, grpc.StatusCode.INTERNAL,
                                  f"request {rid} failed on the decode pod (its log says why)"))
        else:
            self._outbox.put(_end(rid))
