"""``pdserve prefill``: run one prefill pod (the command a Kubernetes pod runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

import grpc

from engine.args import add_pod_arguments, start_pod_engine
from kv_transfer.connector import make_sender
from prefill_service.server import PrefillServicer
from protos import pdserve_pb2_grpc as pb_grpc
from protos.server import run_pod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-connector", default="tcp", choices=["tcp"],
                        help="how KV reaches decode pods")
    parser.add_argument("--transfer-timeout", type=float, default=30.0)
    add_pod_arguments(parser, default_port=50051)


def run(args: argparse.Namespace) -> NoReturn:
    engine, metrics = start_pod_engine(args, "prefill")
    sender = make_sender(args.kv_connector)
    servicer = PrefillServicer(engine, sender, args.kv_connector, Path(args.model).name,
                               metrics, args.transfer_timeout)

    def add(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_PrefillServicer_to_server(servicer, server)
        return ["pdserve.v1.Prefill"]

    async def stop() -> None:
        sender.close()
        engine.shutdown()

    run_pod(add, args.host, args.port,
            lambda port: f"pdserve prefill ready on {args.host}:{port}", stop)
