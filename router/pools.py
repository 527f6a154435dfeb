"""The router's view of the pods: endpoint pools, health, load polling, routing policy.

Every pod gets one grpc.aio channel, reused by all requests. A background task polls each
pod's ``GetLoad`` and the standard ``grpc.health.v1.Health/Check`` every ``poll_interval``
seconds; a pod whose poll fails (or that says NOT_SERVING) leaves its pool until a poll
succeeds again. Routing (DESIGN.md, "One request, end to end"):
- decode: fewest requests (running + waiting), then most free KV blocks;
- prefill: fewest outstanding prefill tokens.
A report is up to one poll old, so the router adds what it has sent to a pod since that
poll began; equal scores rotate, so a burst between two polls spreads over the pool.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from router.errors import APIError

# Messages carry token ids and logprobs only, but a batch of n long sequences with top-20
# logprobs can pass gRPC's 4 MiB default.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # A pod that is down (or not up yet, as under `pdserve up`) must be retried within about
    # a second, not after gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Role(enum.Enum):
    DECODE = "decode"
    PREFILL = "prefill"


@dataclass(slots=True)
class Pod:
    role: Role
    address: str  # host:port of the pod's gRPC server
    channel: grpc.aio.Channel
    stub: pb_grpc.DecodeStub | pb_grpc.PrefillStub
    health: health_pb2_grpc.HealthStub
    healthy: bool | None = None  # None: not polled yet (usable, optimistically)
    report: pb.LoadReport | None = None
    last_error: str = ""
    last_poll: float = 0.0  # time.monotonic() of the last successful poll
    in_flight: int = 0  # requests (decode) or prompt tokens (prefill) open there now
    sent_since_poll: int = 0  # the same, sent since the last report began

    @property
    def usable(self) -> bool:
        return self.healthy is not False

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
            "outstanding_prefill_tokens": r.outstanding_prefill_tokens if r else None,
            "router_in_flight": self.in_flight,
            "layout_fingerprint": r.layout_fingerprint if r else None,
            "kv_connector": r.kv_connector if r else None,
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


@dataclass(slots=True)
class Pools:
    decode: list[Pod]
    prefill: list[Pod]
    poll_interval: float = 0.5
    poll_timeout: float = 1.0
    on_poll: list = field(default_factory=list)  # callbacks(pods) after each poll (metrics)
    _turn: int = field(default=0, init=False)  # rotates ties between equally loaded pods
    _task: asyncio.Task | None = field(default=None, init=False)

    @classmethod
    def connect(cls, decode: list[str], prefill: list[str], poll_interval: float = 0.5
                ) -> Pools:
        """Open one channel per pod. Call inside the running event loop (grpc.aio)."""
        def pod(role: Role, address: str) -> Pod:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            stub_cls = pb_grpc.DecodeStub if role is Role.DECODE else pb_grpc.PrefillStub
            return Pod(role, address, channel, stub_cls(channel),
                       health_pb2_grpc.HealthStub(channel))
        return cls([pod(Role.DECODE, a) for a in decode],
                   [pod(Role.PREFILL, a) for a in prefill], poll_interval)

    @property
    def pods(self) -> list[Pod]:
        return self.decode + self.prefill

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(self._poll_forever(), name="pdserve-router-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(p.channel.close() for p in self.pods), return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.poll()

    async def poll(self) -> None:
        """Ask every pod for its load now (also what ``GET /pools`` shows fresh)."""
        await asyncio.gather(*(self._poll_one(p) for p in self.pods))
        for callback in self.on_poll:
            callback(self.pods)

    async def _poll_one(self, pod: Pod) -> None:
        sent_before = pod.sent_since_poll
        try:
            report, serving = await asyncio.gather(
                pod.stub.GetLoad(pb.LoadRequest(), timeout=self.poll_timeout),
                self._serving(pod))
        except grpc.aio.AioRpcError as exc:
            pod.healthy = False
            pod.last_error = f"{exc.code().name}: {exc.details()}"
            return
        if not serving:  # a pod shutting down says so before it stops answering
            pod.healthy, pod.report, pod.last_error = False, report, "NOT_SERVING"
            return
        pod.healthy, pod.report, pod.last_error = True, report, ""
        pod.last_poll = time.monotonic()
        # What was sent while this poll was in flight may not be in the report yet.
        pod.sent_since_poll = max(0, pod.sent_since_poll - sent_before)

    async def _serving(self, pod: Pod) -> bool:
        """The standard gRPC health check; a server without the service counts as serving."""
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

    def _rotated(self, pods: list[Pod]) -> list[Pod]:
        self._turn += 1
        k = self._turn % len(pods) if pods else 0
        return pods[k:] + pods[:k]

    def pick_decode(self, exclude: frozenset[str] = frozenset()) -> Pod:
        candidates = [p for p in self.decode if p.usable and p.address not in exclude]
        if not candidates:
            raise APIError(503, "no healthy decode pod is available", "server_overloaded",
                           code="no_decode_pod")
        return min(self._rotated(candidates), key=Pod.decode_score)

    def pick_prefill(self) -> Pod | None:
        """None: no prefill pod is healthy; the decode pod then prefills locally."""
        candidates = [p for p in self.prefill if p.usable]
        if not candidates:
            return None
        return min(self._rotated(candidates), key=Pod.prefill_score)

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
        if lease.prefill is not None:
            lease.prefill.in_flight -= lease.prompt_tokens

    def describe(self) -> dict:
        return {"pods": [p.describe() for p in self.pods],
                "healthy_decode": sum(1 for p in self.decode if p.healthy),
                "healthy_prefill": sum(1 for p in self.prefill if p.healthy)}
