"""DecodeServicer: the Decode gRPC service over an AsyncEngine.

Generate (decode-orchestrated, DESIGN.md): the engine matches the prompt against this pod's
prefix cache, reserves blocks for the rest and registers the expected transfer with the
receiver (the request waits in WAITING_FOR_REMOTE_KV); the chosen prefill pod is asked to
fill only those blocks; then the engine decodes with continuous batching and each step's
tokens stream back (GenerateStream: many requests' tokens over one stream, one message per
step; decode_service/stream.py). Short prompts, no prefill pod, or a prefill pod that fails: prefill
locally (conditional disaggregation). Whatever ends the call -- finish, cancel, client
gone, error -- the engine frees the request's blocks (once no transfer touches them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_service.liveness import PeerLiveness
from decode_service.stream import RequestContext, RequestStream
from engine.async_engine import AsyncEngine
from engine.errors import CapacityError, InvalidRequestError, KVTransferError, PdserveError
from engine.external_kv import RemotePlan
from engine.llm_engine import RequestOutput
from engine.metrics import PodMetrics
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob
from engine.tracing import NullSpan, Phases, Tracing, span_or_none
from kv_transfer.connector import KVReceiver, KVTargetSpec
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.channels import ChannelCache
from protos.convert import (
    check_id,
    kv_target_to_proto,
    limits_to_report,
    logprobs_from_proto,
    logprobs_to_proto,
    prompt_logprobs_to_proto,
    sampling_from_proto,
    sampling_to_proto,
    status_of,
)
from protos.drain import DrainGate
from protos.security import LinkSecurity

log = logging.getLogger(__name__)


class RemotePrefillFailed(Exception):
    """The prefill pod could not fill the blocks; the decode pod prefills itself."""


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, engine: AsyncEngine, receiver: KVReceiver | None, connector: str,
                 model_name: str, metrics: PodMetrics, min_remote_prefill_tokens: int = 1,
                 prefill_timeout_s: float = 60.0, admission_timeout_s: float = 30.0,
                 prefill_first_response_timeout_s: float = 2.0,
                 security: LinkSecurity | None = None,
                 tracing: Tracing | None = None, gate: DrainGate | None = None) -> None:
        self.engine = engine
        # the pod's drain gate: GenerateStream counts its requests on it as Generate calls
        self.gate = gate or DrainGate(())
        self.tracing = tracing
        self.receiver = receiver
        self.connector = connector
        self.model_name = model_name
        self.metrics = metrics
        self.min_remote_prefill_tokens = min_remote_prefill_tokens
        self.prefill_timeout_s = prefill_timeout_s
        self.admission_timeout_s = admission_timeout_s
        # to prefill pods (with TLS and the token); idle ones (pods that left) close
        self.channels = ChannelCache(security=security)
        self.handshake_timeout_s = 10.0
        # prefill pods our connector has met -> how many handshakes with each so far
        self._introduced: dict[str, int] = {}
        # one handshake per pod at a time: concurrent first requests to a pod wait for
        # it, or each would make (and the pod replace) its own link (nccl: its own
        # communicator, whose set-up the next handshake aborts)
        self._introducing: dict[str, asyncio.Lock] = {}
        self._active: set[str] = set()  # request ids of the Generate calls running here
        # a prefill pod must answer a ping within this while requests wait on it
        self.liveness = PeerLiveness(self._ping, prefill_first_response_timeout_s)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self.generate_one(request, context):
            yield msg

    async def GenerateStream(self, request_iterator: AsyncIterator[pb.StreamRequest],
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.StreamResponse]:
        stream = RequestStream(self.generate_one, self.gate, self._active.__contains__)
        async for msg in stream.serve(request_iterator):
            yield msg

    async def generate_one(self, request: pb.GenerateRequest,
                           context: grpc.aio.ServicerContext | RequestContext
                           ) -> AsyncIterator[pb.GenerateResponse]:
        """One request, on its own call (Generate) or on a shared stream (GenerateStream)."""
        rid = request.request_id or uuid.uuid4().hex
        try:
            check_id(rid, "the request id", "request_id")
            params = sampling_from_proto(request.sampling)
        except PdserveError as exc:
            await context.abort(status_of(exc), exc.message)
        if rid in self._active:  # refused before anything that could touch the running one
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {rid!r} is already running on this pod")
        self._active.add(rid)
        try:
            async for msg in self._generate(rid, list(request.prompt_token_ids), params,
                                            request.prefill_endpoint, context):
                yield msg
        finally:
            self._active.discard(rid)

    async def _generate(self, rid: str, prompt: list[int], params: SamplingParams,
                        prefill_endpoint: str,
                        context: grpc.aio.ServicerContext | RequestContext
                        ) -> AsyncIterator[pb.GenerateResponse]:
        # prompt logprobs need every prompt row's logits: this pod prefills those itself
        remote = bool(prefill_endpoint) and self.receiver is not None \
            and params.prompt_logprobs is None
        if remote:  # conditional disaggregation: what is left to compute decides
            cached = await self.engine.cached_prefix_tokens(prompt, params.cache_salt)
            remote = len(prompt) - cached >= self.min_remote_prefill_tokens
        outputs: AsyncGenerator[RequestOutput, None] | None = None
        entered = time.monotonic()
        span = span_or_none(self.tracing, "decode", entered, context.invocation_metadata())
        # this request's phases: histograms and spans here; with the first response (and
        # the prefill pod's own phases) to the router, for its access log
        phases = Phases()
        remote_phases: dict[str, float] = {}
        first_at: float | None = None
        try:
            if remote:
                try:
                    outputs = await self._remote_prefill(rid, prompt, params,
                                                         prefill_endpoint, phases,
                                                         remote_phases, span)
                except RemotePrefillFailed as exc:
                    remote = False
                    log.warning("request %s: remote prefill failed (%s); prefilling locally",
                                rid, exc)
            if outputs is None:
                self.metrics.local_prefills.inc()
                outputs = self.engine.generate(rid, prompt, params)
            self.metrics.prefill_decisions.labels("remote" if remote else "local").inc()
            first = True
            counted = False
            tapped = False
            async for out in outputs:
                if first:
                    first_at = time.monotonic()
                    if not remote:
                        admitted = entered + out.queue_seconds
                        phases.add("decode_admission", entered, admitted)
                        phases.add("local_prefill", admitted, first_at)
                    phases.add("first_token", entered, first_at)
                if out.finished and not counted:
                    # before the last message goes out: a client that has it may end the
                    # call at once, and this generator would never run past that yield
                    self.metrics.requests.labels("decode", "ok").inc()
                    counted = True
                yield _response(out, first, remote_prefill=remote,
                                phases={**phases.seconds(), **remote_phases} if first else None)
                first = False
                if not tapped and isinstance(context, RequestContext):
                    # on a shared stream, the rest of its tokens (all but the last output)
                    # go straight from the engine's callback into the stream
                    tapped = self.engine.tap(rid, functools.partial(_emit_output, context.emit))
            if not counted:
                self.metrics.requests.labels("decode", "ok").inc()
        except PdserveError as exc:
            self.metrics.requests.labels("decode", "error").inc()
            await context.abort(status_of(exc), exc.message)
        finally:
            if outputs is not None:
                await outputs.aclose()  # runs the stream's cleanup: frees the blocks
            await self.engine.abort(rid)  # idempotent: nothing left if it finished
            ended = time.monotonic()
            if first_at is not None:
                phases.add("decode", first_at, ended)
            for name, seconds in phases.seconds().items():
                self.metrics.phase(name, seconds)
            phases.to_span(span)
            span.end(ended, request_id=rid, remote_prefill=remote)

    async def _remote_prefill(self, rid: str, prompt: list[int], params: SamplingParams,
                              endpoint: str, phases: Phases, remote_phases: dict[str, float],
                              span: NullSpan) -> AsyncGenerator[RequestOutput, None]:
        assert self.receiver is not None
        # A fresh transfer id per attempt: the receiver refuses an id it has seen (a late
        # write of an old transfer must not land), and a client may well reuse request ids.
        tid = uuid.uuid4().hex
        t0 = time.monotonic()
        plan, queue = await self._reserve(rid, prompt, params, tid)
        phases.add("decode_admission", t0, t1 := time.monotonic())
        target = KVTargetSpec(
            connector=self.connector, address=self.receiver.address, transfer_id=tid,
            block_ids=plan.block_ids, layout_fingerprint=self.engine.layout.fingerprint,
            first_block=plan.first_block)
        sampling = sampling_to_proto(params)
        sampling.seed = plan.seed  # both pods draw the same random stream for this request
        call = pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling,
                                 kv_target=kv_target_to_proto(target))
        try:
            resp = await self._call_prefill_watched(endpoint, call, span.metadata())
            phases.add("remote_prefill", t1, t2 := time.monotonic())
            stats = await plan.transfer.wait_async(self.prefill_timeout_s)
            phases.add("kv_transfer_wait", t2, time.monotonic())
            remote_phases.update(resp.phase_seconds)
        except RemotePrefillFailed:  # the pod stopped answering: its KV may never come
            await self.engine.abort(rid)
            self.metrics.kv_transfer_failures.labels("decode").inc()
            raise
        except grpc.aio.AioRpcError as exc:
            await self.engine.abort(rid)  # cancels the transfer; blocks freed once it drains
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:  # the request's fault: a 400
                raise InvalidRequestError(
                    f"the prefill pod refused the request: {exc.details()}") from None
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                await self.channels.drop(endpoint)
                self._introduced.pop(endpoint, None)  # a restarted pod will not know us
            self.metrics.kv_transfer_failures.labels("decode").inc()
            raise RemotePrefillFailed(f"{exc.code().name}: {exc.details()}") from None
        except KVTransferError as exc:
            await self.engine.abort(rid)
            self.metrics.kv_transfer_failures.labels("decode").inc()
            raise RemotePrefillFailed(exc.message) from None
        except BaseException:
            await self.engine.abort(rid)
            raise
        self.metrics.record_transfer(stats.bytes, stats.seconds, len(plan.block_ids))
        lps: list[TokenLogprob | None] = [logprobs_from_proto(m) for m in resp.first_logprobs]
        lps = lps or [None] * len(resp.first_token_ids)
        return self.engine.complete_remote(rid, queue, list(resp.first_token_ids), lps,
                                           resp.num_cached_tokens)

    async def _call_prefill_watched(self, endpoint: str, call: pb.PrefillRequest,
                                    metadata: list[tuple[str, str]]) -> pb.PrefillResponse:
        """``_call_prefill``, given up (RemotePrefillFailed) as soon as the pod leaves a
        liveness ping unanswered (decode_service/liveness.py)."""
        prefill = asyncio.ensure_future(self._call_prefill(endpoint, call, metadata))
        stalled = asyncio.ensure_future(self.liveness.stalled(endpoint))
        try:
            await asyncio.wait({prefill, stalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stalled.cancel()
            if not prefill.done():
                prefill.cancel()
        if prefill.done() and not prefill.cancelled():
            return prefill.result()
        raise RemotePrefillFailed(f"the prefill pod {endpoint} answered no ping for "
                                  f"{self.liveness.timeout_s:g} s")

    async def _ping(self, endpoint: str, timeout_s: float) -> None:
        channel = await self.channels.get(endpoint)
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout_s)

    async def _call_prefill(self, endpoint: str, call: pb.PrefillRequest,
                            metadata: list[tuple[str, str]]) -> pb.PrefillResponse:
        """Prefill.Prefill, after the connector handshake with that pod if one is due (and
        once more if the pod lost it, e.g. it restarted)."""
        stub = pb_grpc.PrefillStub(await self.channels.get(endpoint))
        met = await self._introduce(endpoint, stub)
        try:
            return await stub.Prefill(call, timeout=self.prefill_timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION or \
                    "unknown KV peer" not in (exc.details() or ""):
                raise
        await self._introduce(endpoint, stub, stale=met)
        return await stub.Prefill(call, timeout=self.prefill_timeout_s, metadata=metadata)

    async def _introduce(self, endpoint: str, stub: pb_grpc.PrefillStub, stale: int = -1
                         ) -> int:
        """Exchange peer info with a prefill pod once (connectors that need it: ucx, nccl),
        or again if handshake number ``stale`` is still the latest (the pod lost it);
        returns the number of the handshake in force."""
        assert self.receiver is not None
        met = self._introduced.get(endpoint, 0)
        if met and met != stale:
            return met
        async with self._introducing.setdefault(endpoint, asyncio.Lock()):
            met = self._introduced.get(endpoint, 0)
            if met and met != stale:  # another request made it while this one waited
                return met
            info = self.receiver.peer_info()
            if info:
                reply = await stub.KVHandshake(pb.KVPeerInfo(
                    connector=self.connector, address=self.receiver.address, info=info),
                    timeout=self.handshake_timeout_s)
                if reply.info:
                    await asyncio.to_thread(self.receiver.add_peer, reply.info)
                self.metrics.kv_handshakes.labels("decode").inc()
            self._introduced[endpoint] = met + 1
            return met + 1

    async def _reserve(self, rid: str, prompt: list[int], params: SamplingParams, tid: str
                       ) -> tuple[RemotePlan, asyncio.Queue]:
        """Admission control: wait (bounded) until the prompt's blocks can be reserved."""
        deadline = time.monotonic() + self.admission_timeout_s
        while True:
            try:
                return await self.engine.reserve_remote(rid, prompt, params,
                                                        self.prefill_timeout_s, tid)
            except CapacityError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
                      ) -> pb.LoadReport:
        snap = self.engine.load()
        report = pb.LoadReport(
            role="decode", model=self.model_name, running=snap.running, waiting=snap.waiting,
            free_blocks=snap.free_blocks, total_blocks=snap.total_blocks,
            layout_fingerprint=self.engine.layout.fingerprint, kv_connector=self.connector,
            kv_address=self.receiver.address if self.receiver is not None else "",
            generate_stream=True)
        limits_to_report(self.engine.limits, report)
        report.metrics_port = self.metrics.port
        return report

    async def close(self) -> None:
        await self.channels.close()


def _emit_output(emit: Callable[[pb.GenerateResponse], None], out: RequestOutput) -> None:
    emit(_response(out, False, remote_prefill=False))


def _response(out: RequestOutput, first: bool, remote_prefill: bool,
              phases: dict[str, float] | None = None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(outputs=[
        pb.SequenceDelta(
            index=d.index, token_ids=d.token_ids,
            logprobs=[logprobs_to_proto(lp) for lp in d.logprobs],
            finish_reason=d.finish_reason.value if d.finish_reason is not None
            and d.finish_reason.value != "abort" else "")
        for d in out.deltas])
    if first:
        msg.prompt_tokens = out.num_prompt_tokens
        msg.cached_tokens = out.num_cached_tokens
        msg.remote_prefill = remote_prefill
        msg.phase_seconds.update(phases or {})
    msg.prompt_logprobs.extend(prompt_logprobs_to_proto(out.prompt_logprobs))
    return msg
