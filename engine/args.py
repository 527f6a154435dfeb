"""Command-line options of the engine, shared by every pod that runs one."""

from __future__ import annotations

import argparse

from engine.llm_engine import EngineArgs, LLMEngine


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", required=True, help="HF-format model directory")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: fill --kv-cache-mb, or the GPU)")
    g.add_argument("--kv-cache-mb", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=0)


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        device=args.device, dtype=args.dtype, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_mb << 20 if args.kv_cache_mb else None,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed)


def add_pod_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Flags every gRPC pod has: where it listens, its metrics port, and the engine's."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="gRPC port (0: any free)")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="Prometheus /metrics port (-1: off, 0: any free)")
    add_engine_arguments(parser)


def start_pod_engine(args: argparse.Namespace, role: str):  # noqa: ANN201
    """Load the model, start the engine thread and the pod's metrics; (AsyncEngine,
    PodMetrics)."""
    import logging

    from engine.async_engine import AsyncEngine
    from engine.metrics import PodMetrics

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(message)s")
    engine = AsyncEngine(LLMEngine(args.model, engine_args_from(args)))
    metrics = PodMetrics(role)
    metrics.watch_engine(engine)
    metrics.serve(args.metrics_port, args.host)
    return engine, metrics
