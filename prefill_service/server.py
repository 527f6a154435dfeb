"""PrefillServicer: the Prefill gRPC service over an AsyncEngine.

Concurrent Prefill calls become requests of one engine, so they are batched by its
scheduler. The forward tells the request's outbound transfer as soon as each layer's KV is
written (engine/external_kv.py); the connector packs and sends it on its own thread, so the
transfer overlaps the remaining layers' compute. Only the blocks the decode pod lacks travel
(the target's first_block). The answer (first tokens) is sent only once the decode pod
acknowledged every layer; the engine holds the request's blocks until the connector is
done reading them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from engine.async_engine import AsyncEngine
from engine.errors import (
    InvalidRequestError,
    KVPeerError,
    KVTransferError,
    PdserveError,
    UnknownPeerError,
)
from engine.external_kv import KVSend
from engine.kv_layout import num_blocks_for
from engine.metrics import PodMetrics
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob
from engine.tracing import Phases, Tracing, span_or_none
from kv_transfer.connector import KVSender, KVTargetSpec, SendHandle, check_layout
from kv_transfer.registry import backend_names
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import (
    check_id,
    kv_target_from_proto,
    limits_to_report,
    logprobs_to_proto,
    sampling_from_proto,
    status_of,
)

log = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, engine: AsyncEngine, sender: KVSender, connector: str, model_name: str,
                 metrics: PodMetrics, transfer_timeout_s: float = 30.0,
                 tracing: Tracing | None = None) -> None:
        self.tracing = tracing
        self.engine = engine
        self.sender = sender
        self.connector = connector
        self.model_name = model_name
        self.metrics = metrics
        self.transfer_timeout_s = transfer_timeout_s
        self.outstanding_tokens = 0
        self._active: set[str] = set()  # request ids of the Prefill calls running here
        self._known_connectors = frozenset(backend_names())

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PrefillResponse:
        prompt = list(request.prompt_token_ids)
        entered = time.monotonic()
        rid = request.request_id
        try:
            check_id(rid, "the request id", "request_id")
            params = sampling_from_proto(request.sampling)
            target = kv_target_from_proto(request.kv_target)
        except (PdserveError, ValueError) as exc:
            await context.abort(status_of(exc), getattr(exc, "message", str(exc)))
        if rid in self._active:  # refused before anything that could touch the running one
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {rid!r} is already running on this pod")
        try:
            handle = self._begin(target, len(prompt))
        except (PdserveError, ValueError) as exc:
            await context.abort(status_of(exc), getattr(exc, "message", str(exc)))
        self._active.add(rid)
        try:
            return await self._prefill(request, prompt, params, handle, context, entered)
        finally:
            self._active.discard(rid)

    async def _prefill(self, request: pb.PrefillRequest, prompt: list[int],
                       params: SamplingParams, handle: SendHandle,
                       context: grpc.aio.ServicerContext, entered: float
                       ) -> pb.PrefillResponse:
        send = KVSend(handle, first_block=request.kv_target.first_block)
        self.outstanding_tokens += len(prompt)
        span = span_or_none(self.tracing, "prefill", entered, context.invocation_metadata())
        began = time.monotonic()
        try:
            first = await self.engine.prefill(request.request_id, prompt, params, send)
            computed = time.monotonic()
            stats = await handle.wait_async(self.transfer_timeout_s)
        except PdserveError as exc:
            handle.cancel()
            self.metrics.kv_transfer_failures.labels("prefill").inc()
            self.metrics.requests.labels("prefill", "error").inc()
            await context.abort(status_of(exc), exc.message)
        except asyncio.CancelledError:
            handle.cancel()
            raise
        finally:
            self.outstanding_tokens -= len(prompt)
            span.end(time.monotonic(), request_id=request.request_id, prompt_tokens=len(prompt))
        self.metrics.record_transfer(stats.bytes, stats.seconds, len(request.kv_target.block_ids),
                                     stats.exposed)
        self.metrics.requests.labels("prefill", "ok").inc()
        acked = time.monotonic()
        timeline = Phases()
        timeline.add("prefill_queue", began, began + first.queue_seconds)
        timeline.add("prefill_compute", began + first.queue_seconds, computed)
        # the transfer's tail that compute did not hide (it ended when the receiver acked)
        timeline.add("kv_transfer_exposed", acked - stats.exposed, acked)
        timeline.to_span(span)
        phases = timeline.seconds()
        for name, seconds in phases.items():
            self.metrics.phase(name, seconds)
        deltas = sorted(first.deltas, key=lambda d: d.index)
        lps: list[TokenLogprob] = [d.logprobs[0] for d in deltas if d.logprobs]
        return pb.PrefillResponse(
            request_id=request.request_id,
            first_token_ids=[d.token_ids[0] for d in deltas],
            first_logprobs=[logprobs_to_proto(lp) for lp in lps],
            num_cached_tokens=first.num_cached_tokens, kv_bytes=stats.bytes,
            kv_seconds=stats.seconds, kv_exposed_seconds=stats.exposed,
            phase_seconds=phases)

    async def KVHandshake(self, request: pb.KVPeerInfo, context: grpc.aio.ServicerContext
                          ) -> pb.KVPeerInfo:
        if request.connector != self.connector:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this prefill pod speaks the {self.connector!r} connector, "
                                f"not {request.connector!r}")
        try:
            reply = await asyncio.to_thread(self.sender.add_peer, request.address, request.info)
        except KVTransferError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        self.metrics.kv_handshakes.labels("prefill").inc()
        return pb.KVPeerInfo(connector=self.connector, info=reply)

    def _begin(self, target: KVTargetSpec, prompt_len: int) -> SendHandle:
        """Check the target against this pod and the prompt, then open the transfer
        (the sender checks the layout fingerprint and tells the receiver on a mismatch)."""
        if target.connector not in self._known_connectors:
            raise InvalidRequestError(f"unknown KV connector {target.connector!r}; known: "
                                      f"{', '.join(sorted(self._known_connectors))}",
                                      param="kv_target")
        check_layout(target.layout_fingerprint, self.engine.layout)
        if target.connector != self.connector:
            raise KVPeerError(f"the KV target uses the {target.connector!r} connector; this "
                              f"prefill pod speaks {self.connector!r}")
        if not self.sender.knows_peer(target.address):
            raise UnknownPeerError(f"unknown KV peer {target.address!r}: handshake first")
        total = num_blocks_for(prompt_len, self.engine.limits.block_size)
        if not 0 <= target.first_block < total or \
                len(target.block_ids) != total - target.first_block:
            raise InvalidRequestError(
                f"the KV target has {len(target.block_ids)} blocks from block "
                f"{target.first_block}; the prompt has {total}", param="kv_target")
        return self.sender.begin(target)

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
                      ) -> pb.LoadReport:
        snap = self.engine.load()
        report = pb.LoadReport(
            role="prefill", model=self.model_name, running=snap.running, waiting=snap.waiting,
            free_blocks=snap.free_blocks, total_blocks=snap.total_blocks,
            outstanding_prefill_tokens=self.outstanding_tokens,
            layout_fingerprint=self.engine.layout.fingerprint, kv_connector=self.connector)
        limits_to_report(self.engine.limits, report)
        report.metrics_port = self.metrics.port
        return report
