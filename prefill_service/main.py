"""``pdserve prefill``: run one prefill pod (the command a Kubernetes pod runs)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc

from engine.args import add_engine_arguments, engine_args_from
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from engine.metrics import PodMetrics
from kv_transfer.connector import make_sender
from prefill_service.server import PrefillServicer
from protos import pdserve_pb2_grpc as pb_grpc
from protos.server import serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free)")
    parser.add_argument("--kv-connector", default="tcp", choices=["tcp"],
                        help="how KV reaches decode pods")
    parser.add_argument("--transfer-timeout", type=float, default=30.0)
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="Prometheus /metrics port (-1: off, 0: any free)")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prefill %(message)s")
    engine = AsyncEngine(LLMEngine(args.model, engine_args_from(args)))
    metrics = PodMetrics("prefill")
    metrics.watch_engine(engine)
    metrics.serve(args.metrics_port, args.host)
    sender = make_sender(args.kv_connector)
    servicer = PrefillServicer(engine, sender, args.kv_connector, Path(args.model).name,
                               metrics, args.transfer_timeout)

    def add(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_PrefillServicer_to_server(servicer, server)
        return ["pdserve.v1.Prefill"]

    async def stop() -> None:
        sender.close()
        engine.shutdown()

    asyncio.run(serve(add, args.host, args.port,
                      lambda port: f"pdserve prefill ready on {args.host}:{port}", stop))
    return 0
