"""DecodeServicer: the Decode gRPC service over an AsyncEngine.

Generate (decode-orchestrated, DESIGN.md): reserve blocks for the prompt, register the
expected transfer with the KV receiver, ask the chosen prefill pod to fill the blocks, then
decode with continuous batching and stream each step's tokens. Short prompts, or no prefill
pod, or a prefill pod that fails: prefill locally (conditional disaggregation). Whatever
ends the call -- finish, cancel, client gone, error -- the request's blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from engine.async_engine import AsyncEngine
from engine.errors import CapacityError, KVTransferError, PdserveError
from engine.llm_engine import RequestOutput
from engine.metrics import PodMetrics
from engine.sampling_params import SamplingParams
from kv_transfer.connector import KVReceiver
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import (
    logprobs_from_proto, logprobs_to_proto, sampling_from_proto, sampling_to_proto, status_of)
from protos.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)


class RemotePrefillFailed(Exception):
    """The prefill pod could not fill the blocks; the decode pod prefills itself."""


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, engine: AsyncEngine, receiver: KVReceiver | None, connector: str,
                 model_name: str, metrics: PodMetrics, min_remote_prefill_tokens: int = 1,
                 prefill_timeout_s: float = 60.0, admission_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.receiver = receiver
        self.connector = connector
        self.model_name = model_name
        self.metrics = metrics
        self.min_remote_prefill_tokens = min_remote_prefill_tokens
        self.prefill_timeout_s = prefill_timeout_s
        self.admission_timeout_s = admission_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _prefill_stub(self, endpoint: str) -> pb_grpc.PrefillStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
        return pb_grpc.PrefillStub(channel)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
        except PdserveError as exc:
            await context.abort(status_of(exc), exc.message)
        remote = bool(request.prefill_endpoint) and self.receiver is not None
        if remote:  # conditional disaggregation: what is left to compute decides
            cached = await self.engine.call(
                lambda: self.engine.engine.cached_prefix_tokens(prompt))
            remote = len(prompt) - cached >= self.min_remote_prefill_tokens
        outputs: AsyncGenerator[RequestOutput, None] | None = None
        try:
            if remote:
                try:
                    outputs = await self._remote_prefill(rid, prompt, params,
                                                         request.prefill_endpoint)
                except RemotePrefillFailed as exc:
                    remote = False
                    log.warning("request %s: remote prefill failed (%s); prefilling locally",
                                rid, exc)
            if outputs is None:
                self.metrics.local_prefills.inc()
                outputs = self.engine.generate(rid, prompt, params)
            first = True
            async for out in outputs:
                yield _response(out, first, remote_prefill=remote)
                first = False
            self.metrics.requests.labels("decode", "ok").inc()
        except PdserveError as exc:
            self.metrics.requests.labels("decode", "error").inc()
            await context.abort(status_of(exc), exc.message)
        finally:
            if outputs is not None:
                await outputs.aclose()  # runs the stream's cleanup: frees the blocks
            await self.engine.abort(rid)  # idempotent: nothing left if it finished

    async def _remote_prefill(self, rid: str, prompt: list[int], params: SamplingParams,
                              endpoint: str) -> AsyncGenerator[RequestOutput, None]:
        assert self.receiver is not None
        blocks, seed, queue = await self._reserve(rid, prompt, params)
        layout = self.engine.engine.layout
        pending = self.receiver.expect(rid, self.engine.engine.runner.kv_caches, blocks, layout)
        sampling = sampling_to_proto(params)
        sampling.seed = seed  # both pods draw the same random stream for this request
        call = pb.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling,
            kv_target=pb.KVTarget(connector=self.connector, address=self.receiver.address,
                                  transfer_id=rid, block_ids=blocks,
                                  layout_fingerprint=layout.fingerprint))
        try:
            resp = await self._prefill_stub(endpoint).Prefill(
                call, timeout=self.prefill_timeout_s)
            stats = await asyncio.to_thread(pending.wait, self.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self.receiver.cancel(rid)
            await self.engine.abort(rid)
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION):
                raise PdserveError(f"prefill pod refused the request: {exc.details()}") from None
            self.metrics.kv_transfer_failures.labels("decode").inc()
            raise RemotePrefillFailed(f"{exc.code().name}: {exc.details()}") from None
        except KVTransferError as exc:
            self.receiver.cancel(rid)
            await self.engine.abort(rid)
            self.metrics.kv_transfer_failures.labels("decode").inc()
            raise RemotePrefillFailed(exc.message) from None
        except BaseException:
            self.receiver.cancel(rid)
            await self.engine.abort(rid)
            raise
        self.metrics.record_transfer(stats.bytes, stats.seconds)
        lps = [logprobs_from_proto(m) for m in resp.first_logprobs] or \
            [None] * len(resp.first_token_ids)
        return self.engine.complete_remote(rid, queue, list(resp.first_token_ids), lps,
                                           resp.num_cached_tokens)

    async def _reserve(self, rid: str, prompt: list[int], params: SamplingParams):  # noqa: ANN202
        """Admission control: wait (bounded) until the prompt's blocks can be reserved."""
        deadline = time.monotonic() + self.admission_timeout_s
        while True:
            try:
                return await self.engine.reserve_remote(rid, prompt, params)
            except CapacityError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
                      ) -> pb.LoadReport:
        snap = self.engine.load()
        return pb.LoadReport(
            role="decode", model=self.model_name, running=snap.running, waiting=snap.waiting,
            free_blocks=snap.free_blocks, total_blocks=snap.total_blocks,
            layout_fingerprint=self.engine.engine.layout.fingerprint,
            kv_connector=self.connector,
            kv_address=self.receiver.address if self.receiver is not None else "")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _response(out: RequestOutput, first: bool, remote_prefill: bool) -> pb.GenerateResponse:
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
    return msg
