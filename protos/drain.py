"""Graceful drain of a gRPC pod: count the calls that are work, refuse new ones once the pod
is shutting down, and wait (bounded) until those already running have finished.

A ``DrainGate`` is a server interceptor. It wraps only the methods named as work (a decode
pod's ``Generate``, a prefill pod's ``Prefill``); ``GetLoad``, ``KVHandshake`` and the health
service keep answering while the pod drains, so the router and kubelet see it say
NOT_SERVING instead of a closed port. A call refused while draining gets UNAVAILABLE before
it started anything, which is what the router retries on another pod. Work that shares one
call (the requests of a decode pod's GenerateStream) is counted with ``try_enter``/``leave``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

DRAINING_MESSAGE = "this pod is draining (shutting down); send the request to another pod"


class DrainGate(grpc.aio.ServerInterceptor):
    def __init__(self, work_methods: Iterable[str]) -> None:
        self.work_methods = frozenset(work_methods)  # full names: /pdserve.v1.Decode/Generate
        self.draining = False
        self.active = 0  # work calls running now
        self._changed = asyncio.Event()  # set whenever ``active`` drops

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.work_methods:
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._gated_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._gated_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        raise TypeError(f"DrainGate cannot gate the streaming-request method "
                        f"{handler_call_details.method}")

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if not self.try_enter():
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)

    def try_enter(self) -> bool:
        """Count one unit of work as running; False (and nothing counted) while draining.
        For work that is not a call of its own: a request on a shared stream."""
        if self.draining:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
        self._changed.set()

    def _gated_stream(self, behavior: Any) -> Callable[..., AsyncIterator[Any]]:
        async def gated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._enter(context)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self.leave()
        return gated

    def _gated_unary(self, behavior: Any) -> Callable[..., Awaitable[Any]]:
        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self.leave()
        return gated

    async def drain(self, timeout: float, hurry: asyncio.Event | None = None) -> bool:
        """Refuse new work from now on and wait until the running calls have finished, for
        at most ``timeout`` seconds (or until ``hurry`` is set); True if none is left."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.active > 0:
            left = deadline - time.monotonic()
            if left <= 0 or (hurry is not None and hurry.is_set()):
                return False
            self._changed.clear()
            waits = [asyncio.ensure_future(self._changed.wait())]
            if hurry is not None:
                waits.append(asyncio.ensure_future(hurry.wait()))
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return True
