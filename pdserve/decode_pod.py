"""``pdserve decode``: run one decode pod (the command a Kubernetes pod runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

import grpc

from decode_service.server import DecodeServicer
from kv_transfer import KVReceiver, backend_names, make_receiver
from pdserve.kv_tier_flags import add_kv_tier_arguments, start_kv_tier
from pdserve.pod import add_pod_arguments, connector_config, start_pod_engine
from protos import pdserve_pb2_grpc as pb_grpc
from protos.drain import DrainGate
from protos.security import security_from_args
from protos.server import run_pod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pod_arguments(parser, default_port=50061, connector_choices=[*backend_names(), "none"],
                      connector_help="how KV arrives from prefill pods (none: always prefill "
                                     "here)")
    add_kv_tier_arguments(parser)
    parser.add_argument("--min-remote-prefill-tokens", type=int, default=1,
                        help="prompts with fewer uncached tokens are prefilled here "
                             "(conditional disaggregation)")
    parser.add_argument("--prefill-timeout", type=float, default=60.0,
                        help="seconds a remote prefill (compute and transfer) may take")
    parser.add_argument("--prefill-first-response-timeout", type=float, default=2.0,
                        help="seconds a prefill pod may leave a liveness ping unanswered "
                             "while requests wait on it; then they prefill here")


def run(args: argparse.Namespace) -> NoReturn:
    security = security_from_args(args)  # a bad flag fails before the model loads
    pod = start_pod_engine(args, "decode")
    engine = pod.engine
    tier = start_kv_tier(args, engine, pod.metrics)
    receiver: KVReceiver | None = None
    if args.kv_connector != "none":
        receiver = make_receiver(args.kv_connector, engine.kv_memory, connector_config(args))
        engine.attach_kv_receiver(receiver)
    # Generate calls are work, and so is each request on a GenerateStream
    gate = DrainGate(["/pdserve.v1.Decode/Generate"])
    servicer = DecodeServicer(engine, receiver, args.kv_connector, Path(args.model).name,
                              pod.metrics, args.min_remote_prefill_tokens, args.prefill_timeout,
                              prefill_first_response_timeout_s=args.prefill_first_response_timeout,
                              security=security, tracing=pod.tracing, gate=gate)

    def add(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_DecodeServicer_to_server(servicer, server)
        return ["pdserve.v1.Decode"]

    async def stop() -> None:
        await servicer.close()
        if receiver is not None:
            receiver.close()
        engine.shutdown()
        if pod.tracing is not None:
            pod.tracing.shutdown()
        if tier is not None:
            tier.close()

    run_pod(add, args.host, args.port,
            lambda port: f"pdserve decode ready on {args.host}:{port}", stop,
            drain_timeout=args.drain_timeout, security=security, gate=gate)
