"""Running a pdserve gRPC server: message limits, the standard health service, and a
graceful stop on SIGTERM/SIGINT. Every pod's main uses ``serve``.

Health has two names, so kubelet can tell "alive" from "takes work": ``""`` (and each
service's name) is readiness -- SERVING while the pod accepts work, NOT_SERVING from the
moment it is told to stop -- and ``LIVENESS`` stays SERVING until the process exits, so a
pod that drains is never restarted for it. On SIGTERM the pod reports NOT_SERVING, refuses
new work with UNAVAILABLE (``protos.drain``), lets running calls finish for up to
``drain_timeout`` seconds, then stops; a second signal cuts the wait short.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.errors import PdserveError
from protos.channels import MAX_MESSAGE_BYTES
from protos.drain import DrainGate
from protos.security import LinkSecurity

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # No SO_REUSEPORT (gRPC's default): a second pod on a taken port must fail, not share it.
    ("grpc.so_reuseport", 0),
]
LIVENESS = "liveness"  # the health service name kubelet's liveness and startup probes ask
DEFAULT_DRAIN_TIMEOUT_S = 25.0  # fits Kubernetes' default 30 s grace period
STOP_GRACE_S = 1.0  # for GetLoad/health calls still open once the work has drained


async def serve(add_servicers: Callable[[grpc.aio.Server], list[str]], host: str, port: int,
                ready_message: Callable[[int], str],
                on_stop: Callable[[], Awaitable[None]] | None = None,
                work_methods: Iterable[str] = (),
                drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
                security: LinkSecurity | None = None, gate: DrainGate | None = None) -> None:
    """Start a server, mark its services SERVING, print ``ready_message(port)``, and run
    until SIGTERM or SIGINT; then drain ``work_methods`` (full method names) for at most
    ``drain_timeout`` seconds and stop. ``security``: TLS and the service token. ``gate``:
    the drain gate, when a servicer counts work of its own on it (else one is made)."""
    security = security or LinkSecurity()
    gate = gate or DrainGate(work_methods)
    # the token check first: a refused call never counts as work in flight
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=[*security.server_interceptors(), gate])
    names = add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        credentials = security.server_credentials()
        bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials
                 else server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:  # grpc raises this when the port is taken
        bound = 0
    if bound == 0:
        raise PdserveError(f"cannot listen on {host}:{port} (in use, or not an address here)")
    await server.start()
    for name in ["", LIVENESS, *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(ready_message(bound), flush=True)
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    started = time.monotonic()
    print(f"draining: {gate.active} call(s) in flight, up to {drain_timeout:g} s", flush=True)
    drained = await gate.drain(drain_timeout, hurry)
    print(f"drained in {time.monotonic() - started:.1f} s" if drained else
          f"drain cut short: cancelling {gate.active} call(s)", flush=True)
    await server.stop(grace=STOP_GRACE_S)
    if on_stop is not None:
        await on_stop()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (a dependency on Linux; the router's uvicorn picks
    it, and httptools, by itself), else asyncio's own. A pod's event loop handles every gRPC
    message and engine callback, holding the GIL the engine thread needs: the cheaper each
    wake-up and callback, the less a step waits (bench/RESULTS.md, issue 15)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_pod(add_servicers: Callable[[grpc.aio.Server], list[str]], host: str, port: int,
            ready_message: Callable[[int], str],
            on_stop: Callable[[], Awaitable[None]] | None = None,
            work_methods: Iterable[str] = (),
            drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
            security: LinkSecurity | None = None, gate: DrainGate | None = None) -> NoReturn:
    """``serve`` until a signal (and the drain), then exit the process at once."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(add_servicers, host, port, ready_message, on_stop, work_methods,
                         drain_timeout, security, gate))
    # Everything is stopped and flushed: skip the interpreter's teardown, which spent
    # seconds of CPU collecting the model's tensors and could outlast `pdserve up`'s grace.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
