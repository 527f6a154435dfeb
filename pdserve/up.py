"""``pdserve up``: a whole serving system on this machine, one process per pod.

Starts N prefill pods, M decode pods and a router as separate processes running the same
commands a Kubernetes pod runs (``pdserve prefill|decode|router``), prints the URL, and
stops them all on Ctrl-C or SIGTERM (or when any of them dies).
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO

from engine.errors import PdserveError

READY = re.compile(r"ready on (\S+:\d+)")
START_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-format model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the router's HTTP port")
    parser.add_argument("--prefill", type=int, default=1, help="number of prefill pods")
    parser.add_argument("--decode", type=int, default=1, help="number of decode pods")
    parser.add_argument("--mode", choices=["disaggregated", "colocated"],
                        default="disaggregated",
                        help="colocated: decode pods prefill themselves, no prefill pods")
    parser.add_argument("--connector", default="tcp", choices=["tcp"], help="KV connector")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--min-remote-prefill-tokens", type=int, default=1)
    parser.add_argument("--pod-args", default="",
                        help="extra engine options for every pod, e.g. '--num-kv-blocks 512'")


@dataclass(slots=True)
class Fleet:
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start_pod(self, name: str, argv: list[str]) -> str:
        """Start a pod with --port 0 and return the host:port it reports when ready."""
        proc = subprocess.Popen([*_pdserve(), *argv], stdout=subprocess.PIPE,
                                stderr=None, text=True, bufsize=1)
        self.procs.append((name, proc))
        deadline = time.monotonic() + START_TIMEOUT_S
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
                match = READY.search(line)
                if match:
                    # keep draining its stdout so a chatty pod never blocks on a full pipe
                    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                    return match.group(1)
            elif proc.poll() is not None:
                break
        raise PdserveError(f"{name} did not start (exit code {proc.poll()})")

    def start_router(self, argv: list[str], url: str) -> None:
        proc = subprocess.Popen([*_pdserve(), "router", *argv])
        self.procs.append(("router", proc))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PdserveError(f"the router exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise PdserveError("the router did not become healthy")

    def any_dead(self) -> str | None:
        return next((n for n, p in self.procs if p.poll() is not None), None)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(stream: IO[str]) -> None:
    for line in stream:
        sys.stdout.write(line)


def _pdserve() -> list[str]:
    return [sys.executable, "-m", "pdserve.cli"]


def run(args: argparse.Namespace) -> int:
    if args.prefill < 0 or args.decode < 1:
        raise PdserveError("need at least one decode pod and a non-negative prefill count")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise PdserveError(f"{args.model!r} is not a model directory (no config.json)")
    colocated = args.mode == "colocated" or args.prefill == 0
    pod_args = args.pod_args.split()
    fleet = Fleet()
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        prefill = [] if colocated else [
            fleet.start_pod(f"prefill-{i}", [
                "prefill", "--model", args.model, "--host", args.host, "--port", "0",
                "--kv-connector", args.connector, *pod_args])
            for i in range(args.prefill)]
        decode = [
            fleet.start_pod(f"decode-{i}", [
                "decode", "--model", args.model, "--host", args.host, "--port", "0",
                "--kv-connector", "none" if colocated else args.connector,
                "--min-remote-prefill-tokens", str(args.min_remote_prefill_tokens), *pod_args])
            for i in range(args.decode)]
        url = f"http://{args.host}:{args.port}"
        router_argv = ["--model", args.model, "--host", args.host, "--port", str(args.port),
                       "--decode", ",".join(decode), "--log-level", "warning"]
        if prefill:
            router_argv += ["--prefill", ",".join(prefill)]
        if args.api_key:
            router_argv += ["--api-key", args.api_key]
        fleet.start_router(router_argv, url)
        mode = "colocated" if colocated else f"{len(prefill)} prefill + {len(decode)} decode"
        print(f"pdserve up: {mode}, OpenAI API at {url}/v1 (Ctrl-C stops)", flush=True)
        while not stop_requested:
            dead = fleet.any_dead()
            if dead is not None:
                raise PdserveError(f"{dead} exited; stopping everything")
            time.sleep(0.2)
        return 0
    finally:
        fleet.stop()
