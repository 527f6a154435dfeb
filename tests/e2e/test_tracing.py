"""OpenTelemetry across three processes: with --otlp-endpoint, one request is one trace --
the router's span, the decode pod's as its child, the prefill pod's as the decode pod's
child (context in gRPC metadata) -- and every phase is a child span of its service's span.
The collector is a real OTLP/gRPC server in this test process, fed by the three real
processes' exporters."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from e2e_helpers import POD_ARGS, Stack, free_port, start_stack
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

PHASES = {
    "pdserve-router": {"router_queue", "time_to_first_token", "decode", "e2e"},
    "pdserve-decode": {"decode_admission", "remote_prefill", "kv_transfer_wait", "first_token",
                       "decode"},
    "pdserve-prefill": {"prefill_queue", "prefill_compute", "kv_transfer_exposed"},
}
ROOTS = {"pdserve-router": "router", "pdserve-decode": "decode", "pdserve-prefill": "prefill"}


@dataclass(frozen=True, slots=True)
class Span:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    start_ns: int
    end_ns: int


class Collector(ts_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request: ts_pb.ExportTraceServiceRequest, context: grpc.ServicerContext
               ) -> ts_pb.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes
                            if a.key == "service.name"), "")
            for scope in rs.scope_spans:
                got += [Span(service, s.name, s.trace_id, s.span_id, s.parent_span_id,
                             s.start_time_unix_nano, s.end_time_unix_nano) for s in scope.spans]
        with self._lock:
            self.spans += got
        return ts_pb.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sink = Collector()
    ts_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield sink, port
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def traced_stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                 collector: tuple[Collector, int]) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-otel"), "--prefill", "1",
                     "--decode", "1", "--pod-args", POD_ARGS,
                     "--otlp-endpoint", f"127.0.0.1:{collector[1]}") as s:
        yield s


def test_one_request_is_one_trace_with_every_phase(traced_stack: Stack,
                                                   collector: tuple[Collector, int]) -> None:
    sink = collector[0]
    stream = traced_stack.client().completions.create(
        model=traced_stack.model, prompt=[9, 10, 11, 12] * 10, max_tokens=5, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)  # (tokens that queue up go out together: not one chunk each)
    assert chunks and chunks[-1].choices[0].finish_reason == "length"

    wanted = sum(len(p) + 1 for p in PHASES.values())
    deadline = time.monotonic() + 20  # exporters batch every 0.5 s
    while len(sink.snapshot()) < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    spans = sink.snapshot()
    assert len(spans) == wanted, sorted((s.service, s.name) for s in spans)
    assert len({s.trace_id for s in spans}) == 1  # one trace

    roots = {s.service: s for s in spans if s.name == ROOTS[s.service]}
    assert set(roots) == set(PHASES)
    router, decode, prefill = (roots[k] for k in ("pdserve-router", "pdserve-decode",
                                                  "pdserve-prefill"))
    assert router.parent_id == b""  # the root
    assert decode.parent_id == router.span_id  # across the router -> decode gRPC call
    assert prefill.parent_id == decode.span_id  # across the decode -> prefill gRPC call
    for service, names in PHASES.items():
        children = {s.name: s for s in spans
                    if s.service == service and s.parent_id == roots[service].span_id}
        assert set(children) == names, (service, sorted(children))
        for child in children.values():
            assert child.start_ns <= child.end_ns
    # the prefill pod's work lies within the decode pod's wait for it (clocks are shared)
    remote = next(s for s in spans if s.name == "remote_prefill")
    compute = next(s for s in spans if s.name == "prefill_compute")
    slack = 5_000_000  # 5 ms: monotonic -> wall conversions in two processes
    assert remote.start_ns - slack <= compute.start_ns <= compute.end_ns <= remote.end_ns + slack
