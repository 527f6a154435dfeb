"""``pdserve up``: a whole serving system on this machine, one process per pod.

Starts N prefill pods, M decode pods and a router as separate processes running the same
commands a Kubernetes pod runs (``pdserve prefill|decode|router``), prints each pod's pid and
address and the URL, supervises them (pdserve/fleet.py: a pod that dies is restarted on its
port, with a backoff and a limit, while the router serves from the others), and stops them
all on Ctrl-C or SIGTERM, or when restarts are exhausted or the router exits, saying why.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from engine.device import cpu_threads_per_pod
from engine.errors import PdserveError
from kv_transfer.registry import backend_names
from pdserve.fleet import Fleet, RestartPolicy, free_port
from protos.security import add_security_arguments, security_argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-format model directory")
    parser.add_argument("--host", default="127.0.0.1", help="where the router listens")
    parser.add_argument("--pod-host", default="127.0.0.1",
                        help="where the pods' gRPC servers and KV receivers listen (apart "
                             "from --host: a public router need not expose its pods)")
    parser.add_argument("--port", type=int, default=8000, help="the router's HTTP port")
    parser.add_argument("--prefill", type=int, default=1, help="number of prefill pods")
    parser.add_argument("--decode", type=int, default=1, help="number of decode pods")
    parser.add_argument("--mode", choices=["disaggregated", "colocated"],
                        default="disaggregated",
                        help="colocated: decode pods prefill themselves, no prefill pods")
    parser.add_argument("--connector", default="tcp", choices=backend_names(),
                        help="KV connector between prefill and decode pods")
    gpu = parser.add_argument_group("GPUs")
    gpu.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                     help="cuda: each pod on a GPU, bf16, CUDA graphs for decode")
    gpu.add_argument("--prefill-gpus", default=None,
                     help="GPU indices for the prefill pods, in order (default: spread)")
    gpu.add_argument("--decode-gpus", default=None,
                     help="GPU indices for the decode pods, in order (default: spread)")
    gpu.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                     help="share of each GPU's memory for pdserve; split evenly between "
                          "the pods that share a GPU")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--otlp-endpoint", default=None,
                        help="HOST:PORT of an OTLP/gRPC collector: the router and every pod "
                             "send trace spans of each request's phases there")
    parser.add_argument("--min-remote-prefill-tokens", type=int, default=1)
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="on stop (or SIGTERM to a pod): seconds each pod may spend "
                             "finishing its running requests")
    parser.add_argument("--restart-limit", type=int, default=5,
                        help="restarts in a row of a pod that dies before `up` gives up and "
                             "stops everything (0: stop at the first death)")
    parser.add_argument("--restart-backoff", type=float, default=1.0,
                        help="seconds before a dead pod's first restart; doubles for each "
                             "next one (at most 30 s)")
    parser.add_argument("--pod-args", default="",
                        help="extra engine options for every pod, e.g. '--num-kv-blocks 512' "
                             "(each CPU pod gets --cpu-threads, its share of the cores, unless "
                             "given here)")
    add_security_arguments(parser)
    parser.add_argument("--prefill-pod-args", default="",
                        help="engine options for prefill pods only, after --pod-args (e.g. a "
                             "larger --max-num-batched-tokens: prefill pods run no decode)")
    parser.add_argument("--decode-pod-args", default="",
                        help="engine options for decode pods only, after --pod-args")
    parser.add_argument("--router-args", default="",
                        help="extra router options, e.g. '--enable-auto-tool-choice "
                             "--tool-call-parser hermes'")


def gpu_placement(num_prefill: int, num_decode: int, num_gpus: int,
                  prefill_gpus: str | None, decode_gpus: str | None,
                  utilization: float) -> tuple[list[list[str]], list[list[str]]]:
    """Device flags for each prefill and each decode pod: its GPU (listed, or spread over
    the GPUs in order: prefill pods first, then decode pods), bf16, and its share of the
    GPU's memory when pods share one."""
    def listed(text: str | None, count: int, start: int) -> list[int]:
        if text is None:
            return [(start + i) % num_gpus for i in range(count)]
        ids = [int(x) for x in text.split(",") if x.strip()]
        if len(ids) != count or any(not 0 <= g < num_gpus for g in ids):
            raise PdserveError(f"expected {count} GPU indices in 0..{num_gpus - 1}, got {text!r}")
        return ids

    if num_gpus < 1:
        raise PdserveError("--device cuda: no CUDA device is visible")
    pre = listed(prefill_gpus, num_prefill, 0)
    dec = listed(decode_gpus, num_decode, num_prefill)
    sharing = {g: (pre + dec).count(g) for g in set(pre + dec)}

    def flags(g: int) -> list[str]:
        return ["--device", f"cuda:{g}", "--dtype", "bfloat16",
                "--gpu-memory-utilization", f"{utilization / sharing[g]:.4f}"]

    return [flags(g) for g in pre], [flags(g) for g in dec]


def _count_gpus() -> int:
    import torch  # only for --device cuda

    return torch.cuda.device_count()


def run(args: argparse.Namespace) -> int:
    if args.prefill < 0 or args.decode < 1:
        raise PdserveError("need at least one decode pod and a non-negative prefill count")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise PdserveError(f"{args.model!r} is not a model directory (no config.json)")
    colocated = args.mode == "colocated" or args.prefill == 0
    pod_args = args.pod_args.split() + security_argv(args)  # the same on every service
    if args.otlp_endpoint:
        pod_args += ["--otlp-endpoint", args.otlp_endpoint]
    num_prefill = 0 if colocated else args.prefill
    if args.device == "cuda":
        pre_dev, dec_dev = gpu_placement(num_prefill, args.decode, _count_gpus(),
                                         args.prefill_gpus, args.decode_gpus,
                                         args.gpu_memory_utilization)
    else:
        pre_dev, dec_dev = [[]] * num_prefill, [[]] * args.decode
    # no CPU pod takes every core; GPU pods keep their default of one thread (engine)
    if args.device != "cuda" and not any(a.startswith("--cpu-threads") for a in pod_args):
        num_pods = args.decode + (0 if colocated else args.prefill)
        pod_args += ["--cpu-threads", str(cpu_threads_per_pod(num_pods))]
    if args.restart_limit < 0 or args.restart_backoff < 0:
        raise PdserveError("--restart-limit and --restart-backoff must be non-negative")
    fleet = Fleet(RestartPolicy(args.restart_limit, args.restart_backoff))
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # Every pod loads its model at once; then each is waited for in turn.
        for i in range(num_prefill):
            fleet.launch(f"prefill-{i}", [
                "prefill", "--model", args.model, "--host", args.pod_host,
                "--port", str(free_port(args.pod_host)),
                "--metrics-port", "0", "--kv-connector", args.connector,
                "--drain-timeout", str(args.drain_timeout), *pre_dev[i], *pod_args,
                *args.prefill_pod_args.split()])
        for i in range(args.decode):
            fleet.launch(f"decode-{i}", [
                "decode", "--model", args.model, "--host", args.pod_host,
                "--port", str(free_port(args.pod_host)),
                "--metrics-port", "0", "--kv-connector", "none" if colocated else args.connector,
                "--min-remote-prefill-tokens", str(args.min_remote_prefill_tokens),
                "--drain-timeout", str(args.drain_timeout), *dec_dev[i], *pod_args,
                *args.decode_pod_args.split()])
        prefill = [fleet.wait_ready(f"prefill-{i}") for i in range(num_prefill)]
        decode = [fleet.wait_ready(f"decode-{i}") for i in range(args.decode)]
        url = f"http://{args.host}:{args.port}"
        router_argv = ["--model", args.model, "--host", args.host, "--port", str(args.port),
                       "--decode", ",".join(decode), "--log-level", "warning",
                       "--drain-timeout", str(args.drain_timeout)]
        if prefill:
            router_argv += ["--prefill", ",".join(prefill)]
        if args.api_key:
            router_argv += ["--api-key", args.api_key]
        if args.otlp_endpoint:
            router_argv += ["--otlp-endpoint", args.otlp_endpoint]
        router_argv += security_argv(args) + args.router_args.split()
        fleet.start_router(router_argv, url)
        mode = "colocated" if colocated else f"{len(prefill)} prefill + {len(decode)} decode"
        print(f"pdserve up: {mode}, OpenAI API at {url}/v1 (Ctrl-C stops)", flush=True)
        while not stop_requested:
            reason = fleet.supervise(time.monotonic())
            if reason is not None:
                raise PdserveError(f"{reason}; stopping everything")
            time.sleep(0.2)
        return 0
    finally:
        fleet.stop(args.drain_timeout)
