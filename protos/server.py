"""Running a pdserve gRPC server: message limits, the standard health service, and a
clean stop on SIGTERM/SIGINT. Every pod's main uses ``serve``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.errors import PdserveError

# KV never travels over gRPC, but token lists of long prompts can pass 4 MiB.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


async def serve(add_servicers: Callable[[grpc.aio.Server], list[str]], host: str, port: int,
                ready_message: Callable[[int], str],
                on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Start a server, mark its services SERVING, print ``ready_message(port)``, and run
    until SIGTERM or SIGINT; then mark NOT_SERVING and stop with a short grace period."""
    # No SO_REUSEPORT (gRPC's default): a second pod on a taken port must fail, not share it.
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    names = add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises this when the port is taken
        bound = 0
    if bound == 0:
        raise PdserveError(f"cannot listen on {host}:{port} (in use, or not an address here)")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(ready_message(bound), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=2.0)
    if on_stop is not None:
        await on_stop()


def run_pod(add_servicers: Callable[[grpc.aio.Server], list[str]], host: str, port: int,
            ready_message: Callable[[int], str],
            on_stop: Callable[[], Awaitable[None]] | None = None) -> NoReturn:
    """``serve`` until a signal, then exit the process at once."""
    asyncio.run(serve(add_servicers, host, port, ready_message, on_stop))
    # Everything is stopped and flushed: skip the interpreter's teardown, which spent
    # seconds of CPU collecting the model's tensors and could outlast `pdserve up`'s grace.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
