"""The router's side of GenerateStream: every request sent to one decode pod shares a stream.

At 64 concurrent streams a decode pod sends 64 messages per engine step when each request
has its own Generate call, and reading them one by one was a quarter of the router's CPU;
on the shared stream a step's tokens for every request arrive as one message
(decode_service/stream.py is the pod's side). Each request is read through a
``StreamedCall``, which behaves as the Generate call it replaces: ``read()`` returns its
responses, then ``grpc.aio.EOF``, or raises the ``AioRpcError`` Generate would have ended
with; ``cancel()`` aborts it on the pod.

Pods that serve GenerateStream say so in their load report; the router uses Generate calls
with the others (older pods) and before a pod's first report. If the stream breaks, every
request on it fails with UNAVAILABLE (as their own calls would when the pod goes away) and
the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class GenerateCall(Protocol):
    """What the router reads a request's responses through: a Generate call or a
    ``StreamedCall``."""

    async def read(self) -> object: ...

    def cancel(self) -> bool: ...


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Link:
    """One open GenerateStream call and the requests on it."""

    def __init__(self, stub: pb_grpc.DecodeStub) -> None:
        self.outgoing: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
        self.calls: dict[str, asyncio.Queue] = {}
        self.pending = pb.StreamRequest()
        self.flush_scheduled = False
        self.broken = False
        self.call = stub.GenerateStream(self._requests())

    async def _requests(self) -> AsyncIterator[pb.StreamRequest]:
        while True:
            yield await self.outgoing.get()

    def send(self, start: pb.GenerateStart | None = None, cancel: str | None = None) -> None:
        """Queue a start or a cancel; what one turn of the event loop queues goes as one
        message."""
        if start is not None:
            self.pending.start.append(start)
        if cancel is not None:
            self.pending.cancel.append(cancel)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        message, self.pending = self.pending, pb.StreamRequest()
        self.outgoing.put_nowait(message)

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        self.broken = True
        calls, self.calls = self.calls, {}
        for queue in calls.values():
            queue.put_nowait(error)


class StreamedCall:
    """One request on a pod's shared stream, read as its own Generate call would be."""

    def __init__(self, link: _Link, request_id: str, queue: asyncio.Queue) -> None:
        self._link = link
        self._request_id = request_id
        self._queue = queue
        self._ended = False

    async def read(self) -> pb.GenerateResponse | object:
        if self._ended:
            return grpc.aio.EOF
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item.end:
            return item.response
        self._ended = True
        if item.code == 0:
            return grpc.aio.EOF
        raise rpc_error(_STATUS.get(item.code, grpc.StatusCode.UNKNOWN), item.details)

    def cancel(self) -> bool:
        """Abort the request on the pod (a no-op once it ended)."""
        if self._ended:
            return False
        self._ended = True
        if self._link.calls.get(self._request_id) is self._queue:  # not a refused duplicate's
            del self._link.calls[self._request_id]
            if not self._link.broken:
                self._link.send(cancel=self._request_id)
        return True


class DecodeStream:
    """The shared stream to one decode pod, opened on first use and again after a break."""

    def __init__(self, stub: pb_grpc.DecodeStub) -> None:
        self._stub = stub
        self._link: _Link | None = None
        self._reader: asyncio.Task | None = None

    def start(self, request: pb.GenerateRequest, metadata: Iterable[tuple[str, str]]
              ) -> StreamedCall:
        link = self._link
        if link is None or link.broken:
            link = self._link = _Link(self._stub)
            self._reader = asyncio.create_task(self._read(link))
        queue: asyncio.Queue = asyncio.Queue()
        if request.request_id in link.calls:  # its items could not be told apart
            queue.put_nowait(rpc_error(grpc.StatusCode.ALREADY_EXISTS,
                                       f"request id {request.request_id!r} is already running "
                                       "on this decode pod"))
            return StreamedCall(link, request.request_id, queue)
        link.calls[request.request_id] = queue
        link.send(start=pb.GenerateStart(request=request, metadata=dict(metadata)))
        return StreamedCall(link, request.request_id, queue)

    async def _read(self, link: _Link) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the decode pod ended the request stream")
        try:
            async for message in link.call:
                for item in message.items:
                    queue = link.calls.get(item.request_id)
                    if queue is None:
                        continue  # cancelled here: its last items may still come
                    if item.end:
                        del link.calls[item.request_id]
                    queue.put_nowait(item)
        except grpc.aio.AioRpcError as exc:
            error = exc if exc.code() is not grpc.StatusCode.CANCELLED else rpc_error(
                grpc.StatusCode.UNAVAILABLE, "the request stream to the decode pod closed")
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the router is closing")
            raise
        finally:
            link.fail(error)
            if self._link is link:
                self._link = None

    def close(self) -> None:
        if self._link is not None:
            self._link.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
