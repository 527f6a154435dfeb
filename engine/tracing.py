"""OpenTelemetry traces of requests across router -> decode pod -> prefill pod (optional).

Off unless a service starts with ``--otlp-endpoint HOST:PORT`` (an OTLP/gRPC collector).
Then one request is one trace: the router's span ``router`` is its root; the W3C trace
context (``traceparent``) travels in gRPC metadata, so the decode pod's span ``decode`` is
the router's child and the prefill pod's ``prefill`` the decode pod's. Every phase (router
queue, decode admission, prefill queue, prefill compute, KV transfer, first token, decode)
is a child span of its service's span, with the phase's own start and end.

Spans are built from the phase timestamps the services keep anyway (``time.monotonic``),
so no code path changes when tracing is off (the ``NO_SPAN`` stand-in does nothing). The
opentelemetry packages are the ``otel`` extra and are imported only when tracing is on.
Nothing here is global: each service owns its ``Tracing`` and shuts it down on exit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# gRPC metadata: (key, value) pairs, as a tuple, a list or grpc.aio.Metadata
Metadata = Iterable[tuple[str, str | bytes]] | Any


def wall_ns(monotonic: float) -> int:
    """A ``time.monotonic()`` reading as epoch nanoseconds (what spans carry)."""
    return time.time_ns() + int((monotonic - time.monotonic()) * 1e9)


class NullSpan:
    """What a service uses when tracing is off."""

    def metadata(self) -> list[tuple[str, str]]:
        return []

    def phase(self, name: str, start: float, end: float) -> None:
        pass

    def end(self, at: float, **attributes: Any) -> None:
        pass


NO_SPAN = NullSpan()


class RequestSpan(NullSpan):
    """One service's span of one request; its phases become its children."""

    def __init__(self, tracing: Tracing, name: str, start: float,
                 parent: Metadata | None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = tracing.tracer
        self._propagator = tracing.propagator
        ctx = None
        if parent:
            carrier = {k.lower(): v if isinstance(v, str) else v.decode() for k, v in parent}
            ctx = self._propagator.extract(carrier)
        self._span = self._tracer.start_span(name, context=ctx, start_time=wall_ns(start))
        self._ctx = trace.set_span_in_context(self._span)

    def metadata(self) -> list[tuple[str, str]]:
        """gRPC metadata carrying this span as the parent of the next service's."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._ctx)
        return list(carrier.items())

    def phase(self, name: str, start: float, end: float) -> None:
        child = self._tracer.start_span(name, context=self._ctx, start_time=wall_ns(start))
        child.end(end_time=wall_ns(max(end, start)))

    def end(self, at: float, **attributes: Any) -> None:
        for key, value in attributes.items():
            self._span.set_attribute(f"pdserve.{key}", value)
        self._span.end(end_time=wall_ns(at))


@dataclass(slots=True)
class Tracing:
    provider: Any  # opentelemetry.sdk.trace.TracerProvider
    tracer: Any
    propagator: Any

    def span(self, name: str, start: float, parent: Metadata | None = None) -> RequestSpan:
        return RequestSpan(self, name, start, parent)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is queued


def start_tracing(service: str, endpoint: str | None, exporter: Any = None
                  ) -> Tracing | None:
    """Tracing to the OTLP/gRPC collector at ``endpoint`` (``exporter``: another span
    exporter, e.g. the SDK's in-memory one); None when neither is given."""
    if not endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    # spans leave in batches off the request path, at most half a second late
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return Tracing(provider, provider.get_tracer("pdserve"), TraceContextTextMapPropagator())


def span_or_none(tracing: Tracing | None, name: str, start: float,
                 parent: Metadata | None = None) -> NullSpan:
    return tracing.span(name, start, parent) if tracing is not None else NO_SPAN


@dataclass(slots=True)
class Phases:
    """A request's phases on one service: name -> (start, end), ``time.monotonic()``."""

    spans: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, name: str, start: float, end: float) -> None:
        self.spans[name] = (start, max(start, end))

    def seconds(self) -> dict[str, float]:
        return {name: end - start for name, (start, end) in self.spans.items()}

    def to_span(self, span: NullSpan) -> None:
        for name, (start, end) in self.spans.items():
            span.phase(name, start, end)
