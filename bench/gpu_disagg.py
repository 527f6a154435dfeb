"""The disaggregation experiment: 1 prefill + 1 decode pod against 2 colocated replicas on
the same two GPUs, one trace, increasing request rates (issue 13).

For each system it starts ``pdserve up`` (disaggregated: ``--prefill 1 --decode 1`` with
the prefill pod on GPU 0 and the decode pod on GPU 1 over ``--connector``; colocated:
``--mode colocated --decode 2``, one replica per GPU behind the router), warms it up, then
for each rate sends the same seeded trace with ``pdserve bench``'s client (inputs uniform
in ``--input-len``, outputs uniform in ``--output-len``, Poisson arrivals) and records TTFT
p99, ITL p50/p99 and goodput (share and rate of requests with TTFT <= ``--slo-ttft-ms``
and TPOT <= ``--slo-tpot-ms``), plus the mean of every request phase (router, decode and
prefill pods' ``pdserve:request_phase_seconds``) so a miss shows where the time went. A
system's sweep stops after the first rate where fewer than ``--stop-below`` of its requests
met the SLO. Servers are stopped on exit, error, Ctrl-C and SIGTERM.

Outputs in ``--out``: ``<system>.json`` (pdserve bench's format: ``pdserve bench compare
colocated.json disaggregated.json --plot DIR`` plots them where matplotlib is), the phase
means in ``phases.json``, ``summary.md`` (the table for bench/RESULTS.md) and, if
matplotlib imports, the PNGs. The systems run one after the other (each needs both GPUs'
memory for its whole sweep).

GPU (2 GPUs; the model made on the GPU, as bench/RESULTS.md records)::

    pdserve make-model --arch llama --out /tmp/m8b --layers 32 --hidden 4096 --heads 32 \\
        --kv-heads 8 --intermediate 14336 --vocab 128256 --dtype bfloat16 \\
        --max-position-embeddings 65536
    PYTHONPATH=. python3 bench/gpu_disagg.py --model /tmp/m8b --device cuda \\
        --connector ucx --rates 0.5,1,2,3,4,6 --num-requests 100 --out /tmp/disagg

CPU path (correctness of the script, a tiny model; figures mean nothing)::

    .venv/bin/python bench/gpu_disagg.py --model models/default --device cpu \\
        --input-len 16-128 --output-len 8-16 --rates 2,4 --num-requests 12 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 200 --out /tmp/disagg-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: pdserve is this tree's
from pdserve.bench.arrivals import parse_rates, schedule  # noqa: E402
from pdserve.bench.client import Target, run_workload  # noqa: E402
from pdserve.bench.report import run_record, write_json  # noqa: E402
from pdserve.bench.stats import SLO, summarize  # noqa: E402
from pdserve.bench.workload import LengthDist, build_workload, parse_length, vocab_of  # noqa: E402

READY = re.compile(r"OpenAI API at (http://\S+)/v1")
START_TIMEOUT_S = 900.0  # an 8B model loads in about a minute per pod; a margin
PHASE_LINE = re.compile(r'^pdserve:request_phase_seconds_(sum|count)\{phase="([a-z0-9_]+)",'
                        r'role="([a-z]+)"\} (\S+)$', re.M)


def system_args(system: str, device: str, connector: str) -> list[str]:
    if system == "colocated":  # two replicas, one per GPU, behind one router
        argv = ["--mode", "colocated", "--decode", "2"]
        return argv + (["--decode-gpus", "0,1"] if device == "cuda" else [])
    argv = ["--prefill", "1", "--decode", "1", "--connector", connector]
    return argv + (["--prefill-gpus", "0", "--decode-gpus", "1"] if device == "cuda" else [])


class Server:
    """One ``pdserve up`` (its own process group); output to ``log``."""

    def __init__(self, args: argparse.Namespace, system: str, port: int, log: Path) -> None:
        argv = [sys.executable, "-m", "pdserve.cli", "up", "--model", str(args.model),
                "--port", str(port), *system_args(system, args.device, args.connector)]
        if args.device == "cuda":
            argv += ["--device", "cuda"]
        if args.pod_args:
            argv += ["--pod-args", args.pod_args]
        if args.prefill_pod_args and system == "disaggregated":
            argv += ["--prefill-pod-args", args.prefill_pod_args]
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = ""

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = READY.search(self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"pdserve up did not start; {self.log} ends with:\n"
                           f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # pdserve up stops its pods, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group is this server's only
                self.proc.wait()
        self._out.close()


def phase_totals(url: str) -> dict[str, tuple[float, float]]:
    """``role/phase`` -> (sum of seconds, count) over the router and every pod."""
    pages = [httpx.get(f"{url}/metrics", timeout=30).text]
    for pod in httpx.get(f"{url}/pools", timeout=30).json()["pods"]:
        if pod.get("metrics_port"):
            host = pod["address"].rsplit(":", 1)[0]
            pages.append(httpx.get(f"http://{host}:{pod['metrics_port']}/metrics",
                                   timeout=30).text)
    totals: dict[str, list[float]] = {}
    for page in pages:
        for kind, phase, role, value in PHASE_LINE.findall(page):
            entry = totals.setdefault(f"{role}/{phase}", [0.0, 0.0])
            entry[0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def phase_means_ms(before: dict[str, tuple[float, float]],
                   after: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for key, (s1, c1) in sorted(after.items()):
        s0, c0 = before.get(key, (0.0, 0.0))
        if c1 > c0:
            out[key] = (s1 - s0) / (c1 - c0) * 1e3
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--connector", default="ucx", help="disaggregated system's KV connector")
    p.add_argument("--systems", default="colocated,disaggregated")
    p.add_argument("--rates", default="0.5,1,2,3,4,6", help="requests/s, increasing")
    p.add_argument("--num-requests", type=int, default=100, help="requests per rate")
    p.add_argument("--input-len", default="128-8192", help="N, LO-HI or lognormal:M,S[,LO-HI]")
    p.add_argument("--output-len", default="128-512")
    p.add_argument("--concurrency", type=int, default=256, help="cap on requests in flight")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--stop-below", type=float, default=0.5,
                   help="stop a system's sweep after a rate where fewer requests met the SLO")
    p.add_argument("--warmup", type=int, default=32,
                   help="unmeasured requests per system (the trace's lengths, highest rate)")
    p.add_argument("--pod-args", default="", help="passed to pdserve up --pod-args")
    p.add_argument("--prefill-pod-args", default="",
                   help="the disaggregated system's prefill pod only, e.g. "
                        "'--max-num-batched-tokens 8192'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    if not set(args.systems) <= {"colocated", "disaggregated"} or not args.systems:
        p.error("--systems: colocated and/or disaggregated")
    args.rates = parse_rates(args.rates)
    args.input_len, args.output_len = parse_length(args.input_len), parse_length(args.output_len)
    return args


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_system_rate(server: Server, model: str, items: list, rate: float,
                    args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, float]]:
    before = phase_totals(server.url)
    schedule(items, rate, "poisson", args.seed)
    results, duration = asyncio.run(run_workload(Target(server.url, model), items,
                                                 args.concurrency))
    summary = summarize(results, duration, SLO(args.slo_ttft_ms, args.slo_tpot_ms))
    return run_record(rate, summary, results), phase_means_ms(before, phase_totals(server.url))


SUSTAINED = 0.9  # colocated "sustains its SLO" at a rate where this share of requests met it


def goal_check(docs: dict[str, list[dict[str, Any]]]) -> str:
    """Issue 13's goals, read off the runs: at the highest rate where colocated sustains its
    SLO, disaggregated's ITL p99/p50 (goal <= 1.3) and its goodput over colocated's (goal
    >= 2)."""
    colo, disagg = docs.get("colocated", []), docs.get("disaggregated", [])
    held = [r for r in colo if r["summary"]["goodput_share"] >= SUSTAINED]
    if not held or not disagg:
        return (f"goals: not checked (colocated met its SLO for >= {SUSTAINED:.0%} of "
                f"requests at no rate run, or only one system ran)")
    top = max(held, key=lambda r: float(r["rate"]))
    other = next((r for r in disagg if r["rate"] == top["rate"]), None)
    if other is None:
        return f"goals: disaggregated did not run at {top['rate']} req/s"
    d, c = other["summary"], top["summary"]
    spread = d["p99_itl_ms"] / d["p50_itl_ms"] if d["p50_itl_ms"] else math.inf
    ratio = d["goodput"] / c["goodput"] if c["goodput"] else math.inf
    return (f"goals at {top['rate']} req/s, the highest rate where colocated sustains its SLO "
            f"(>= {SUSTAINED:.0%} of requests within it): disaggregated ITL p99/p50 "
            f"{spread:.2f} (goal <= 1.3: {'met' if spread <= 1.3 else 'missed'}), goodput "
            f"{ratio:.2f}x colocated's (goal >= 2: {'met' if ratio >= 2 else 'missed'})")


def summary_table(docs: dict[str, list[dict[str, Any]]]) -> str:
    head = "| rate (req/s) | system | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | ITL p99/p50 " \
           "| goodput (req/s) | within SLO | completed |"
    lines = [head, "|" + "---|" * 9]
    rates = sorted({r["rate"] for runs in docs.values() for r in runs}, key=float)
    for rate in rates:
        for system, runs in docs.items():
            run = next((r for r in runs if r["rate"] == rate), None)
            if run is None:
                continue
            s = run["summary"]
            lines.append(
                f"| {rate} | {system} | {s['p99_ttft_ms']:.1f} | {s['p50_itl_ms']:.2f} | "
                f"{s['p99_itl_ms']:.2f} | {s['p99_itl_ms'] / s['p50_itl_ms']:.2f} | "
                f"{s['goodput']:.2f} | {s['goodput_share']:.0%} | {int(s['completed'])}/"
                f"{int(s['completed'] + s['failed'])} |")
    return "\n".join(lines)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = vocab_of(args.model)
    items = build_workload(args.seed, args.num_requests, vocab, args.input_len,
                           args.output_len)
    # the warm-up is the trace's kind of traffic at the highest rate: short warm-ups left the
    # first measured rate paying for first-seen shapes (kernels compiled on first use)
    warm = build_workload(args.seed + 1, args.warmup, vocab, args.input_len, args.output_len)
    schedule(warm, max(args.rates), "poisson", args.seed + 1)
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: servers are stopped
    print(f"{args.model}: {len(items)} requests per rate, input {args.input_len.describe()}, "
          f"output {args.output_len.describe()}, rates {args.rates}, SLO TTFT <= "
          f"{args.slo_ttft_ms} ms and TPOT <= {args.slo_tpot_ms} ms; systems {args.systems}",
          flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    phases: dict[str, dict[str, dict[str, float]]] = {s: {} for s in args.systems}
    urls: dict[str, str] = {}
    model = ""
    try:
        # one system at a time: each takes both GPUs (memory) for its whole sweep
        for system in args.systems:
            server = Server(args, system, free_port(), args.out / f"{system}.log")
            try:
                urls[system] = server.wait_ready()
                model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
                asyncio.run(run_workload(Target(server.url, model), warm, args.concurrency))
                print(f"{system}: up at {server.url}", flush=True)
                for i, rate in enumerate(args.rates):
                    # fresh prompts per rate (the same for every system): a rate that
                    # re-sent the last one's would find them in the pods' prefix caches
                    items = build_workload(args.seed + 1000 * (i + 1), args.num_requests,
                                           vocab, args.input_len, args.output_len)
                    record, means = run_system_rate(server, model, items, rate, args)
                    runs[system].append(record)
                    phases[system][str(rate)] = means
                    s = record["summary"]
                    print(f"[{system} @ {rate} req/s] TTFT p99 {s['p99_ttft_ms']:.1f} ms, ITL "
                          f"p50 {s['p50_itl_ms']:.2f} / p99 {s['p99_itl_ms']:.2f} ms, goodput "
                          f"{s['goodput']:.2f} req/s ({s['goodput_share']:.0%} within SLO), "
                          f"{int(s['failed'])} failed; phases (ms): "
                          + ", ".join(f"{k} {v:.1f}" for k, v in means.items()), flush=True)
                    if s["goodput_share"] < args.stop_below:
                        break  # past where it breaks its SLO
            finally:
                server.stop()
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    settings = {k: (v.describe() if isinstance(v, LengthDist) else str(v) if isinstance(
        v, Path) else v) for k, v in vars(args).items()}
    settings["rates"] = ["inf" if math.isinf(r) else r for r in args.rates]
    for system, records in runs.items():
        write_json(args.out / f"{system}.json", system, urls.get(system, ""), model, settings,
                   records)
    (args.out / "phases.json").write_text(json.dumps(phases, indent=1))
    table = summary_table(runs) + "\n\n" + goal_check(runs)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    try:
        from pdserve.bench.report import plot, read_json

        for path in plot([read_json(args.out / f"{s}.json") for s in runs], args.out):
            print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not installed: plot later with `pdserve bench compare "
              + " ".join(str(args.out / f"{s}.json") for s in runs) + " --plot DIR`")
    failed = sum(int(r["summary"]["failed"]) for rs in runs.values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
