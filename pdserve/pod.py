"""What every gRPC pod (prefill, decode) shares at start-up: its flags (where it listens,
its KV connector, and the engine's options generated from EngineArgs), loading the engine
on its thread, its metrics, and its connector's configuration."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.metrics import PodMetrics
from engine.tracing import Tracing, start_tracing
from kv_transfer import ConnectorConfig, backend_names
from pdserve.flags import add_dataclass_arguments, dataclass_from_args
from protos.security import add_security_arguments, security_from_args
from protos.server import DEFAULT_DRAIN_TIMEOUT_S


def add_pod_arguments(parser: argparse.ArgumentParser, default_port: int,
                      connector_choices: list[str] | None = None,
                      connector_help: str = "") -> None:
    """Flags every pod has: where it listens, its metrics port, its KV connector (choices
    from the backend registry) and the engine's options."""
    parser.add_argument("--model", required=True, help="HF-format model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="gRPC port (0: any free)")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="Prometheus /metrics port (-1: off, 0: any free)")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM: seconds running requests may take to finish before "
                             "the pod exits (keep it below Kubernetes' grace period)")
    choices = connector_choices if connector_choices is not None else backend_names()
    kv = parser.add_argument_group("KV connector")
    kv.add_argument("--kv-connector", default="tcp", choices=choices, help=connector_help)
    kv.add_argument("--kv-port", type=int, default=0,
                    help="port of the connector's receiver, if it has one (0: any free)")
    kv.add_argument("--kv-advertise-host", default=None,
                    help="the host peers dial for KV, when --host is a wildcard")
    kv.add_argument("--kv-connect-timeout", type=float, default=5.0)
    parser.add_argument("--otlp-endpoint", default=None,
                        help="HOST:PORT of an OTLP/gRPC collector: send a trace span per "
                             "request and per phase (the otel extra; default: off)")
    add_security_arguments(parser)
    add_dataclass_arguments(parser, EngineArgs, "engine")


def connector_config(args: argparse.Namespace) -> ConnectorConfig:
    return ConnectorConfig(host=args.host, port=args.kv_port,
                           advertise_host=args.kv_advertise_host,
                           connect_timeout_s=args.kv_connect_timeout,
                           token=security_from_args(args).token)


GPU_POD_SWITCH_INTERVAL_S = 0.0005


@dataclass(slots=True)
class PodEngine:
    engine: AsyncEngine
    metrics: PodMetrics
    tracing: Tracing | None = None


def start_pod_engine(args: argparse.Namespace, role: str) -> PodEngine:
    """Load the model, start the engine thread and the pod's metrics."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(message)s")
    engine_args = dataclass_from_args(EngineArgs, args)
    if engine_args.device.startswith("cuda"):
        # The engine thread drops the GIL in every wait for the GPU and must then take it
        # back from the gRPC thread, which with many streams is always busy: by default
        # that takes up to 5 ms, a whole decode step of an 8B model. Hand it over sooner.
        sys.setswitchinterval(GPU_POD_SWITCH_INTERVAL_S)
    engine = AsyncEngine(LLMEngine(args.model, engine_args))
    metrics = PodMetrics(role)
    metrics.watch_engine(engine)
    metrics.serve(args.metrics_port, args.host)
    return PodEngine(engine, metrics, start_tracing(f"pdserve-{role}", args.otlp_endpoint))
