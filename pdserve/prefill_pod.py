"""``pdserve prefill``: run one prefill pod (the command a Kubernetes pod runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

import grpc

from kv_transfer import make_sender
from pdserve.kv_tier_flags import add_kv_tier_arguments, start_kv_tier
from pdserve.pod import add_pod_arguments, connector_config, start_pod_engine
from prefill_service.server import PrefillServicer
from protos import pdserve_pb2_grpc as pb_grpc
from protos.security import security_from_args
from protos.server import run_pod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pod_arguments(parser, default_port=50051, connector_help="how KV reaches decode pods")
    add_kv_tier_arguments(parser)
    parser.add_argument("--transfer-timeout", type=float, default=30.0,
                        help="seconds a request's KV transfer may take once computed")


def run(args: argparse.Namespace) -> NoReturn:
    security = security_from_args(args)  # a bad flag fails before the model loads
    pod = start_pod_engine(args, "prefill")
    engine = pod.engine
    tier = start_kv_tier(args, engine, pod.metrics)
    sender = make_sender(args.kv_connector, engine.kv_memory, connector_config(args))
    servicer = PrefillServicer(engine, sender, args.kv_connector, Path(args.model).name,
                               pod.metrics, args.transfer_timeout, pod.tracing)
    pod.metrics.watch_prefill_queue(lambda: servicer.outstanding_tokens)

    def add(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_PrefillServicer_to_server(servicer, server)
        return ["pdserve.v1.Prefill"]

    async def stop() -> None:
        sender.close()
        engine.shutdown()
        if pod.tracing is not None:
            pod.tracing.shutdown()
        if tier is not None:
            tier.close()

    run_pod(add, args.host, args.port,
            lambda port: f"pdserve prefill ready on {args.host}:{port}", stop,
            work_methods=["/pdserve.v1.Prefill/Prefill"], drain_timeout=args.drain_timeout,
            security=security)
