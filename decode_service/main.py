"""``pdserve decode``: run one decode pod (the command a Kubernetes pod runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

import grpc

from decode_service.server import DecodeServicer
from engine.args import add_pod_arguments, start_pod_engine
from kv_transfer.connector import make_receiver
from protos import pdserve_pb2_grpc as pb_grpc
from protos.server import run_pod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-connector", default="tcp", choices=["tcp", "none"],
                        help="how KV arrives from prefill pods (none: always prefill locally)")
    parser.add_argument("--kv-port", type=int, default=0, help="KV receiver port (0: any free)")
    parser.add_argument("--min-remote-prefill-tokens", type=int, default=1,
                        help="prompts with fewer uncached tokens are prefilled here "
                             "(conditional disaggregation)")
    parser.add_argument("--prefill-timeout", type=float, default=60.0)
    add_pod_arguments(parser, default_port=50061)


def run(args: argparse.Namespace) -> NoReturn:
    engine, metrics = start_pod_engine(args, "decode")
    receiver = None if args.kv_connector == "none" else \
        make_receiver(args.kv_connector, args.host, args.kv_port)
    servicer = DecodeServicer(engine, receiver, args.kv_connector, Path(args.model).name,
                              metrics, args.min_remote_prefill_tokens, args.prefill_timeout)

    def add(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_DecodeServicer_to_server(servicer, server)
        return ["pdserve.v1.Decode"]

    async def stop() -> None:
        await servicer.close()
        if receiver is not None:
            receiver.close()
        engine.shutdown()

    run_pod(add, args.host, args.port,
            lambda port: f"pdserve decode ready on {args.host}:{port}", stop)
