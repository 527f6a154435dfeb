"""The router's view of the pods: who is in each pool, their health and load, and leases.

Every pod gets one grpc.aio channel, reused by all requests. A background task polls each
pod's ``GetLoad`` and the standard ``grpc.health.v1.Health/Check`` every ``poll_interval``
seconds; a pod whose poll fails (or that says NOT_SERVING) is skipped until a poll succeeds
again. Pools change while the router runs (``add``, ``remove``, ``set_members``: what
Kubernetes discovery drives): a removed pod takes no new request and its channel closes
once its last request is over. Which pod a request goes to is a ``RoutingPolicy``'s choice
(router/policy.py); the pods' reports carry their limits, which the router validates
prompts against (``context_limit``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.channels import open_channel
from protos.security import LinkSecurity
from router.decode_stream import DecodeStream, GenerateCall

log = logging.getLogger(__name__)


class Role(enum.Enum):
    DECODE = "decode"
    PREFILL = "prefill"


@dataclass(slots=True)
class Pod:
    role: Role
    address: str  # host:port of the pod's gRPC server
    channel: grpc.aio.Channel | None
    stub: pb_grpc.DecodeStub | pb_grpc.PrefillStub | None
    health: health_pb2_grpc.HealthStub | None
    healthy: bool | None = None  # None: not polled yet (usable, optimistically)
    report: pb.LoadReport | None = None
    last_error: str = ""
    last_poll: float = 0.0  # time.monotonic() of the last successful poll
    in_flight: int = 0  # requests (decode) or prompt tokens (prefill) open there now
    sent_since_poll: int = 0  # the same, sent since the last report began
    leaving: bool = False  # removed from its pool: no new requests; closes when idle
    polls: int = 0  # GetLoad/health polls on its channel now
    stream: DecodeStream | None = None  # decode pods: the requests' shared stream

    def generate(self, request: pb.GenerateRequest, metadata: list[tuple[str, str]]
                 ) -> GenerateCall:
        """Start a request on this decode pod: on its shared stream, or as a Generate call
        of its own where the pod has not reported GenerateStream."""
        assert isinstance(self.stub, pb_grpc.DecodeStub)
        if self.report is None or not self.report.generate_stream:
            return self.stub.Generate(request, metadata=metadata)
        if self.stream is None:
            self.stream = DecodeStream(self.stub)
        return self.stream.start(request, metadata)

    @property
    def usable(self) -> bool:
        return self.healthy is not False and not self.leaving

    def decode_score(self) -> tuple[int, int]:
        r = self.report
        queued = (r.running + r.waiting) if r else 0
        return queued + self.sent_since_poll, -(r.free_blocks if r else 0)

    def prefill_score(self) -> int:
        r = self.report
        return (r.outstanding_prefill_tokens if r else 0) + self.sent_since_poll

    def describe(self) -> dict:
        r = self.report
        return {
            "role": (r.role if r and r.role else self.role.value),
            "pool": self.role.value,
            "address": self.address,
            "healthy": bool(self.healthy),
            "running": r.running if r else None,
            "waiting": r.waiting if r else None,
            "free_blocks": r.free_blocks if r else None,
            "total_blocks": r.total_blocks if r else None,
            "max_model_len": r.max_model_len if r and r.max_model_len else None,
            "outstanding_prefill_tokens": r.outstanding_prefill_tokens if r else None,
            "router_in_flight": self.in_flight,
            "layout_fingerprint": r.layout_fingerprint if r else None,
            "kv_connector": r.kv_connector if r else None,
            "metrics_port": r.metrics_port if r and r.metrics_port else None,
            "kv_block_bytes": r.kv_block_bytes if r and r.kv_block_bytes else None,
            "last_error": self.last_error or None,
            "seconds_since_poll": (round(time.monotonic() - self.last_poll, 3)
                                   if self.last_poll else None),
        }


@dataclass(slots=True)
class Lease:
    """What one request holds on the pools, given back by ``Pools.release``."""

    decode: Pod
    prefill: Pod | None
    prompt_tokens: int
    released: bool = False


def connect(role: Role, address: str, security: LinkSecurity | None = None) -> Pod:
    """A pod with its channel open (call inside the running event loop: grpc.aio)."""
    channel = open_channel(address, security)
    stub_cls = pb_grpc.DecodeStub if role is Role.DECODE else pb_grpc.PrefillStub
    return Pod(role, address, channel, stub_cls(channel),
               health_pb2_grpc.HealthStub(channel))


@dataclass(slots=True)
class Pools:
    members: list[Pod] = field(default_factory=list)  # current pods of both pools
    poll_interval: float = 0.5
    poll_timeout: float = 1.0
    connector: Callable[[Role, str], Pod] = connect  # how a new member is opened
    on_poll: list[Callable[[list[Pod]], None]] = field(default_factory=list)
    on_leave: list[Callable[[Pod], None]] = field(default_factory=list)
    _task: asyncio.Task | None = field(default=None, init=False)
    _closing: set[asyncio.Task] = field(default_factory=set, init=False)

    @classmethod
    def connect(cls, decode: Iterable[str], prefill: Iterable[str],
                poll_interval: float = 0.5) -> Pools:
        pools = cls(poll_interval=poll_interval)
        for address in decode:
            pools.add(Role.DECODE, address)
        for address in prefill:
            pools.add(Role.PREFILL, address)
        return pools

    @property
    def decode(self) -> list[Pod]:
        return [p for p in self.members if p.role is Role.DECODE]

    @property
    def prefill(self) -> list[Pod]:
        return [p for p in self.members if p.role is Role.PREFILL]

    @property
    def pods(self) -> list[Pod]:
        return list(self.members)

    # -- membership -------------------------------------------------------------------

    def add(self, role: Role, address: str) -> Pod:
        """Add a pod to a pool (idempotent); it takes requests once a poll finds it healthy
        or before its first poll (optimistically)."""
        for pod in self.members:
            if pod.address == address and pod.role is role:
                return pod
        pod = self.connector(role, address)
        self.members.append(pod)
        return pod

    def remove(self, address: str) -> None:
        """Take a pod out of its pool: no new requests; its channel closes when its last
        request is over (at once if it has none)."""
        for pod in [p for p in self.members if p.address == address]:
            self.members.remove(pod)
            pod.leaving = True
            for callback in self.on_leave:
                callback(pod)
            self._close_if_idle(pod)

    def set_members(self, role: Role, addresses: Iterable[str]) -> None:
        """Make ``role``'s pool exactly ``addresses`` (what a discovery round found)."""
        wanted = list(dict.fromkeys(addresses))
        for pod in [p for p in self.members if p.role is role and p.address not in wanted]:
            self.remove(pod.address)
        for address in wanted:
            self.add(role, address)

    def _close_if_idle(self, pod: Pod) -> None:
        # Closing a grpc.aio channel cancels its calls, and a cancelled call raises
        # CancelledError in whoever awaits it: wait for the last request and poll.
        if pod.leaving and pod.in_flight == 0 and pod.polls == 0 and pod.channel is not None:
            channel, pod.channel = pod.channel, None
            if pod.stream is not None:
                pod.stream.close()
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- polling ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(self._poll_forever(), name="pdserve-router-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        channels = [p.channel for p in self.members if p.channel is not None]
        for pod in self.members:
            if pod.stream is not None:
                pod.stream.close()
        self.members = []
        await asyncio.gather(*(c.close() for c in channels), *self._closing,
                             return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll()
            except Exception:  # a poller that dies leaves every pod's numbers frozen
                log.exception("polling the pools failed; polling again")

    async def poll(self) -> None:
        """Ask every pod for its load now (also what ``GET /pools`` shows fresh)."""
        pods = list(self.members)
        await asyncio.gather(*(self._poll_one(p) for p in pods))
        for callback in self.on_poll:
            callback(pods)

    async def _poll_one(self, pod: Pod) -> None:
        if pod.stub is None or pod.health is None or pod.channel is None:
            return
        sent_before = pod.sent_since_poll
        pod.polls += 1
        try:
            report, serving = await asyncio.gather(
                pod.stub.GetLoad(pb.LoadRequest(), timeout=self.poll_timeout),
                self._serving(pod))
        except grpc.aio.AioRpcError as exc:
            pod.healthy = False
            pod.last_error = f"{exc.code().name}: {exc.details()}"
            return
        finally:
            pod.polls -= 1
            self._close_if_idle(pod)
        if not serving:  # a pod shutting down says so before it stops answering
            pod.healthy, pod.report, pod.last_error = False, report, "NOT_SERVING"
            return
        pod.healthy, pod.report, pod.last_error = True, report, ""
        pod.last_poll = time.monotonic()
        # What was sent while this poll was in flight may not be in the report yet.
        pod.sent_since_poll = max(0, pod.sent_since_poll - sent_before)

    async def _serving(self, pod: Pod) -> bool:
        """The standard gRPC health check; a server without the service counts as serving."""
        assert pod.health is not None
        try:
            reply = await pod.health.Check(health_pb2.HealthCheckRequest(service=""),
                                           timeout=self.poll_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return True
            raise
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def mark_unhealthy(self, pod: Pod, reason: str) -> None:
        pod.healthy, pod.last_error = False, reason

    # -- limits and leases ------------------------------------------------------------

    def context_limit(self, default: int) -> int:
        """The longest context every healthy pod can hold, as they report it (a prompt must
        fit whichever pod the policy picks); ``default`` until a pod has reported."""
        limits = [p.report.max_model_len for p in self.members
                  if p.usable and p.report is not None and p.report.max_model_len > 0]
        return min(limits) if limits else default

    def lease(self, decode: Pod, prefill: Pod | None, prompt_tokens: int) -> Lease:
        decode.in_flight += 1
        decode.sent_since_poll += 1
        if prefill is not None:
            prefill.in_flight += prompt_tokens
            prefill.sent_since_poll += prompt_tokens
        return Lease(decode, prefill, prompt_tokens)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        lease.decode.in_flight -= 1
        self._close_if_idle(lease.decode)
        if lease.prefill is not None:
            lease.prefill.in_flight -= lease.prompt_tokens
            self._close_if_idle(lease.prefill)

    def describe(self) -> dict:
        return {"pods": [p.describe() for p in self.members],
                "healthy_decode": sum(1 for p in self.decode if p.healthy),
                "healthy_prefill": sum(1 for p in self.prefill if p.healthy)}
