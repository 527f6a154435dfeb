"""Running one ``Job`` against the decode pool: gRPC streams in, per-choice text deltas out.

Read it top to bottom; one request goes through these steps:
1. ``Generation.events`` starts one ``Decode.Generate`` request per prompt (a batch of
   prompts runs them concurrently and merges their events), on the decode pod's shared
   stream (router/decode_stream.py) or as a call of its own. ``n`` > 1 is one call: the decode
   pod forks the n sequences.
2. ``_open`` picks a decode pod (least loaded) and a prefill pod (fewest outstanding prefill
   tokens) and reads the first response. A pod that is unreachable before answering is
   marked unhealthy and the next one is tried.
3. ``_prompt_events`` feeds each ``SequenceDelta`` to that sequence's
   ``IncrementalDetokenizer``, which applies stop strings. A sequence the router stops
   (stop string) is done even though the pod may still stream it; once every sequence is
   done, or the client goes away (the task is cancelled), the call is cancelled, which
   aborts the request on the decode pod and frees its blocks.
The events (``PromptStart``, ``ChoiceDelta``) are formatted into OpenAI responses by
``router.responses``. Usage counts and latency metrics are kept here, where tokens arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from engine.tokenizer import IncrementalDetokenizer
from engine.tracing import NO_SPAN, NullSpan, Phases, Tracing, span_or_none
from protos import pdserve_pb2 as pb
from protos.convert import sampling_to_proto
from router.decode_stream import GenerateCall
from router.errors import APIError
from router.metrics import RouterMetrics
from router.policy import RouteRequest, RoutingPolicy, no_decode_pod
from router.pools import Lease, Pools
from router.preprocess import Job

# One line per request (``--access-log``): counts, outcome and every phase's milliseconds.
access_log = logging.getLogger("pdserve.access")
# the order phases are printed in: the router's, then the decode and prefill pods'
PHASE_ORDER = ("router_queue", "decode_admission", "prefill_queue", "prefill_compute",
               "kv_transfer_exposed", "remote_prefill", "kv_transfer_wait", "local_prefill",
               "first_token", "time_to_first_token", "decode", "e2e")


@dataclass(slots=True)
class PromptStart:
    """A decode pod accepted prompt ``prompt_index`` (its first response arrived)."""

    prompt_index: int
    prompt_tokens: int
    cached_tokens: int
    # prompt logprobs (positions 1..) when the job asked for them
    prompt_logprobs: list[pb.Logprobs] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice: text to emit and the tokens it consumed."""

    index: int  # choice index: prompt_index * n + sequence index
    text: str
    token_ids: list[int]
    logprobs: list[pb.Logprobs]  # one per token id when logprobs were asked, else empty
    finish_reason: str | None = None  # "stop" | "length" on the choice's last delta


Event = PromptStart | ChoiceDelta


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(slots=True)
class _Sequence:
    detok: IncrementalDetokenizer
    done: bool = False  # no more output for the client (pod finished it, or a stop string)
    pod_finished: bool = False  # the pod sent its finish_reason (it generates no more)


@dataclass(slots=True)
class _Failed:
    error: BaseException


_PROMPT_DONE = object()  # a merged prompt stream has ended


@dataclass(slots=True)
class Generation:
    """One job's run. Iterate ``events()`` once; read ``usage`` as it goes."""

    job: Job
    pools: Pools
    policy: RoutingPolicy
    tokenizer: Any
    metrics: RouterMetrics
    usage: Usage = field(default_factory=Usage)
    finish_reasons: list[str] = field(default_factory=list)
    # when the HTTP request arrived (before parsing and tokenizing): TTFT, E2E and the
    # router_queue phase start here, as vLLM's do
    arrival: float = field(default_factory=time.monotonic)
    _first_token_at: float | None = None
    _sent_at: float | None = None  # the first Generate call went out
    # seconds per phase: the pods' (from the first response), then the router's
    phases: dict[str, float] = field(default_factory=dict)
    # where each prompt went ("decode<-prefill" addresses, "local" when the decode pod
    # prefilled it): the access log says so, to tell one pod's trouble from another's
    routes: list[str] = field(default_factory=list)
    tracing: Tracing | None = None
    _span: NullSpan = NO_SPAN

    async def events(self) -> AsyncGenerator[Event, None]:
        self._span = span_or_none(self.tracing, "router", self.arrival)
        self.usage.prompt_tokens = sum(len(p) for p in self.job.prompts)
        self.metrics.request_started()
        ended: float | None = None
        failed = False
        try:
            if len(self.job.prompts) == 1:
                async for event in self._prompt_events(0):
                    yield event
            else:
                async for event in self._merged():
                    yield event
            ended = time.monotonic()
        except APIError as exc:
            failed = True
            self.metrics.request_failed(exc.status)
            raise
        finally:
            if ended is None and not failed:  # the client went away (or stopped reading)
                self.finish_reasons.append("abort")
            e2e = ended - self.arrival if ended is not None else None
            self.metrics.request_finished(self.usage.prompt_tokens,
                                          self.usage.completion_tokens, e2e,
                                          self.finish_reasons)
            self._record_phases(ended, "error" if failed else "ok" if ended else "abort")

    def _record_phases(self, ended: float | None, outcome: str) -> None:
        """The router's phases into its histogram; every phase into the access log."""
        timeline = Phases()
        if self._sent_at is not None:
            timeline.add("router_queue", self.arrival, self._sent_at)
        if self._first_token_at is not None:
            timeline.add("time_to_first_token", self.arrival, self._first_token_at)
            if ended is not None:
                timeline.add("decode", self._first_token_at, ended)
        if ended is not None:
            timeline.add("e2e", self.arrival, ended)
        mine = timeline.seconds()
        for name, seconds in mine.items():
            self.metrics.phase(name, seconds)
        timeline.to_span(self._span)
        self._span.end(ended or time.monotonic(), request_id=self.job.request_id,
                       outcome=outcome, prompt_tokens=self.usage.prompt_tokens,
                       completion_tokens=self.usage.completion_tokens)
        if not access_log.isEnabledFor(logging.INFO):
            return
        phases = {**self.phases, **mine}
        shown = [p for p in PHASE_ORDER if p in phases] + sorted(set(phases) - set(PHASE_ORDER))
        access_log.info(
            "%s %s prompt_tokens=%d completion_tokens=%d cached_tokens=%d finish=%s %s "
            "pods=%s",
            self.job.request_id, outcome, self.usage.prompt_tokens,
            self.usage.completion_tokens, self.usage.cached_tokens,
            ",".join(self.finish_reasons) or "-",
            " ".join(f"{p}_ms={phases[p] * 1e3:.2f}" for p in shown),
            ",".join(self.routes) or "-")

    async def _merged(self) -> AsyncIterator[Event]:
        """Run every prompt's stream concurrently; yield their events as they come."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for event in self._prompt_events(index):
                    await queue.put(event)
            except Exception as exc:
                await queue.put(_Failed(exc))
            finally:
                await queue.put(_PROMPT_DONE)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.job.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is _PROMPT_DONE:
                    remaining -= 1
                elif isinstance(item, _Failed):
                    raise item.error
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _open(self, index: int) -> tuple[GenerateCall, Lease, pb.GenerateResponse]:
        """Start Generate on the best decode pod; return the call and its first response."""
        ids = self.job.prompts[index]
        request = pb.GenerateRequest(
            request_id=f"{self.job.request_id}-{index}", prompt_token_ids=ids,
            sampling=sampling_to_proto(self.job.params[index]))
        tried: set[str] = set()
        last_error: APIError | None = None
        while True:
            route = RouteRequest(ids, frozenset(tried), self.job.params[index].cache_salt)
            try:
                pod = self.policy.pick_decode(route)
            except APIError:
                raise last_error or no_decode_pod() from None
            prefill = self.policy.pick_prefill(route)
            request.prefill_endpoint = prefill.address if prefill is not None else ""
            lease = self.pools.lease(pod, prefill, len(ids))
            if self._sent_at is None:
                self._sent_at = time.monotonic()
            call = pod.generate(request, self._span.metadata())
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                self.pools.release(lease)
                last_error = APIError.from_grpc(exc, pod.address)
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise last_error from None
                # Unreachable before it answered: nothing started there; try another pod.
                self.pools.mark_unhealthy(pod, f"UNAVAILABLE: {exc.details()}")
                tried.add(pod.address)
                continue
            except BaseException:  # cancelled (client gone) while waiting
                call.cancel()
                self.pools.release(lease)
                raise
            if first is grpc.aio.EOF:
                self.pools.release(lease)
                raise APIError(502, f"decode pod {pod.address} ended the stream without output",
                               "upstream_error")
            self.routes.append(f"{pod.address}<-{prefill.address if prefill else 'local'}")
            return call, lease, cast(pb.GenerateResponse, first)

    async def _prompt_events(self, index: int) -> AsyncIterator[Event]:
        job = self.job
        params = job.params[index]
        sequences = [
            _Sequence(IncrementalDetokenizer(self.tokenizer, job.prompts[index], params.stop,
                                             params.include_stop_str_in_output,
                                             job.skip_special_tokens,
                                             stop_token_ids=params.stop_token_ids))
            for _ in range(params.n)]
        call, lease, response = await self._open(index)
        try:
            self.usage.cached_tokens += response.cached_tokens
            self.phases.update(response.phase_seconds)
            yield PromptStart(index, len(job.prompts[index]), response.cached_tokens,
                              list(response.prompt_logprobs))
            last_step = time.monotonic()
            while True:
                for out in response.outputs:
                    delta = self._advance(index, sequences, out)
                    if delta is not None:
                        yield delta
                if all(s.done for s in sequences) and not all(s.pod_finished for s in sequences):
                    return  # stop strings ended what the pod still generates: cancel it
                read = await call.read()
                if read is grpc.aio.EOF:
                    if all(s.done for s in sequences):
                        return  # the pod finished every sequence and closed the stream
                    raise APIError(502, f"decode pod {lease.decode.address} ended the stream "
                                   "before every sequence finished", "upstream_error")
                response = cast(pb.GenerateResponse, read)
                now = time.monotonic()
                self.metrics.inter_token(now - last_step)
                last_step = now
        except grpc.aio.AioRpcError as exc:
            raise APIError.from_grpc(exc, lease.decode.address) from None
        finally:
            # A no-op on a call that ended; otherwise it aborts the request on the decode pod
            # and frees its blocks (a stop string, the client gone, an error).
            call.cancel()
            self.pools.release(lease)

    def _advance(self, index: int, sequences: list[_Sequence], out: pb.SequenceDelta
                 ) -> ChoiceDelta | None:
        """Feed one sequence's new tokens to its detokenizer; the delta to emit, if any."""
        if not 0 <= out.index < len(sequences):
            raise APIError(502, f"decode pod sent sequence index {out.index} of "
                           f"{len(sequences)}", "upstream_error")
        seq = sequences[out.index]
        seq.pod_finished = seq.pod_finished or bool(out.finish_reason)
        if seq.done:  # stopped by a stop string here; the pod may still be streaming it
            return None
        step = seq.detok.add(list(out.token_ids))
        kept = step.num_tokens  # tokens after the one completing a stop string are dropped
        text = step.text
        finish: str | None = None
        if step.stopped:
            finish = "stop"
        elif out.finish_reason:
            text += seq.detok.flush()
            finish = "stop" if seq.detok.stopped else out.finish_reason
        if kept and self._first_token_at is None:
            self._first_token_at = time.monotonic()
            self.metrics.first_token(self._first_token_at - self.arrival)
        self.usage.completion_tokens += kept
        if finish is not None:
            seq.done = True
            self.finish_reasons.append(finish)
        if not (text or kept or finish):
            return None
        logprobs = list(out.logprobs[:kept]) if self.job.logprobs is not None else []
        return ChoiceDelta(index * len(sequences) + out.index, text,
                           list(out.token_ids[:kept]), logprobs, finish)
