"""PrefillServicer: the Prefill gRPC service over an AsyncEngine.

Concurrent Prefill calls become requests of one engine, so they are batched by its
scheduler. Each layer's KV is handed to the connector as soon as the forward wrote it
(engine's kv_sink), so the transfer overlaps the remaining layers' compute. The answer
(first tokens) is sent only once the decode pod acknowledged every layer.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from engine.async_engine import AsyncEngine
from engine.errors import PdserveError
from engine.metrics import PodMetrics
from engine.sequence import TokenLogprob
from kv_transfer.connector import KVSender, KVTargetSpec
from kv_transfer.wire import pack_layer
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import logprobs_to_proto, sampling_from_proto, status_of

log = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, engine: AsyncEngine, sender: KVSender, connector: str, model_name: str,
                 metrics: PodMetrics, transfer_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.sender = sender
        self.connector = connector
        self.model_name = model_name
        self.metrics = metrics
        self.transfer_timeout_s = transfer_timeout_s
        self.outstanding_tokens = 0

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PrefillResponse:
        layout = self.engine.engine.layout
        target = request.kv_target
        if target.layout_fingerprint != layout.fingerprint:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV layout mismatch: decode pod {target.layout_fingerprint}, "
                                f"prefill pod {layout.fingerprint} (same model, dtype and "
                                f"block size on both sides?)")
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            handle = self.sender.begin(KVTargetSpec(
                connector=target.connector, address=target.address,
                transfer_id=target.transfer_id, block_ids=tuple(target.block_ids),
                layout_fingerprint=target.layout_fingerprint), layout)
        except (PdserveError, ValueError) as exc:
            await context.abort(status_of(exc), str(exc))

        def sink(layer: int, cache, block_ids: list[int]) -> None:  # noqa: ANN001
            handle.send_layer(layer, pack_layer(cache, block_ids))

        self.outstanding_tokens += len(prompt)
        try:
            first = await self.engine.prefill(request.request_id, prompt, params, sink)
            stats = await asyncio.to_thread(handle.finish, self.transfer_timeout_s)
        except PdserveError as exc:
            handle.abort()
            self.metrics.kv_transfer_failures.labels("prefill").inc()
            self.metrics.requests.labels("prefill", "error").inc()
            await context.abort(status_of(exc), exc.message)
        except asyncio.CancelledError:
            handle.abort()
            raise
        finally:
            self.outstanding_tokens -= len(prompt)
        self.metrics.record_transfer(stats.bytes, stats.seconds)
        self.metrics.requests.labels("prefill", "ok").inc()
        deltas = sorted(first.deltas, key=lambda d: d.index)
        lps: list[TokenLogprob] = [d.logprobs[0] for d in deltas if d.logprobs]
        return pb.PrefillResponse(
            request_id=request.request_id,
            first_token_ids=[d.token_ids[0] for d in deltas],
            first_logprobs=[logprobs_to_proto(lp) for lp in lps],
            num_cached_tokens=first.num_cached_tokens, kv_bytes=stats.bytes,
            kv_seconds=stats.seconds)

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
                      ) -> pb.LoadReport:
        snap = self.engine.load()
        return pb.LoadReport(
            role="prefill", model=self.model_name, running=snap.running, waiting=snap.waiting,
            free_blocks=snap.free_blocks, total_blocks=snap.total_blocks,
            outstanding_prefill_tokens=self.outstanding_tokens,
            layout_fingerprint=self.engine.engine.layout.fingerprint,
            kv_connector=self.connector)
