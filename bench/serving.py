"""Serving benchmark: TTFT, inter-token latency and throughput, colocated vs disaggregated.

Like vLLM's benchmark_serving, but it also runs the servers, from the tree this file lives
in: for each mode it starts ``pdserve up`` (colocated: ``--mode colocated --decode 1``;
disaggregated: ``--prefill 1 --decode 1``), warms it up, sends the same seeded workload over
the OpenAI streaming API (``/v1/completions``, token-id prompts so prompt lengths are exact,
``ignore_eos`` so output lengths are exact), stops it, and prints one table with every mode
and the ratio disaggregated / colocated. ``--repeats`` alternates the modes and pools::

    .venv/bin/python bench/serving.py --model models/default \\
        --num-requests 64 --input-len 64-512 --output-len 64 --rate 8 --concurrency 16

``--turns T`` makes it a multi-turn chat workload instead: num-requests / T sessions, each a
conversation whose turn k+1 sends turn k's prompt, turn k's answer (its token ids) and
``--turn-len`` new tokens, after turn k has finished -- most of each later prompt is a
prefix some pod has computed before. ``--tree DIR`` runs the servers from another checkout
(an older commit, to compare against), with this file's client and statistics.

The workload, the measuring client and the statistics are ``pdserve bench``'s
(pdserve/bench/: TTFT, ITL, TPOT as vLLM defines them); this file is the experiment harness
around them: start each system, run the same workload on it, stop it. CPU seconds of the server
processes, this client and everything else (from /proc) show a run disturbed by other work.
Servers are always stopped: on exit, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from any folder: pdserve is this tree's
from pdserve.bench.arrivals import schedule  # noqa: E402
from pdserve.bench.client import RequestResult, Target, run_workload  # noqa: E402
from pdserve.bench.stats import summarize as summarize_results  # noqa: E402
from pdserve.bench.workload import LengthDist, Vocab, WorkItem, build_workload, parse_length  # noqa: E402

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 600.0
MODE_ARGS = {
    "colocated": ["--mode", "colocated", "--decode", "1"],
    "disaggregated": ["--prefill", "1", "--decode", "1"],
}


# -- workload -------------------------------------------------------------------------------

def parse_range(text: str) -> LengthDist:
    try:
        return parse_length(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def workload(seed: int, n: int, input_len: LengthDist, output_len: LengthDist, vocab: int,
             rate: float, turns: int = 1, turn_len: LengthDist | None = None
             ) -> list[WorkItem]:
    """pdserve bench's workload with Poisson arrivals; ids below 4 are the toy tokenizers'
    special tokens (real text never needs them)."""
    items = build_workload(seed, n, Vocab(vocab, frozenset(range(4))), input_len, output_len,
                           turns=turns, turn_len=turn_len)
    return schedule(items, rate, "poisson", seed)


# -- the server under test ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``pdserve up`` process (which owns its pods); its output goes to ``log_path``."""

    def __init__(self, model: str, mode: str, pod_args: str, pod_threads: int | None,
                 log_path: Path, tree: Path = REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = [sys.executable, "-m", "pdserve.cli", "up", "--model", model,
                "--port", str(self.port), *MODE_ARGS[mode]]
        if pod_args:
            argv += ["--pod-args", pod_args]
        env = dict(os.environ)
        if pod_threads:
            env["OMP_NUM_THREADS"] = str(pod_threads)  # torch reads it at start-up
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 -- closed in stop()
        self._ready = threading.Event()
        # own session: a terminal Ctrl-C reaches only us, and we stop the fleet in order
        self.proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if line.startswith("pdserve up:") and "OpenAI API at" in line:
                self._ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                tail = "".join(self.log_path.read_text().splitlines(True)[-5:])
                raise RuntimeError(f"pdserve up did not start (exit code {self.proc.poll()}); "
                                   f"{self.log_path} ends with:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # pdserve up stops its pods, then exits
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # last resort: the group holds only processes this Server started
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# -- the client (pdserve bench's) ----------------------------------------------------------

async def served_model(url: str) -> tuple[str, list[dict]]:
    async with httpx.AsyncClient(timeout=10) as client:
        models = (await client.get(f"{url}/v1/models")).json()["data"]
        pods = (await client.get(f"{url}/pools")).json()["pods"]
        return models[0]["id"], pods


def kv_received(pods: list[dict]) -> tuple[float, float] | None:
    """(bytes, blocks) of KV the decode pods have received, from their /metrics; None when
    the pods do not report a metrics port (servers older than the KV seam)."""
    total_bytes = total_blocks = 0.0
    for pod in pods:
        if pod["pool"] != "decode":
            continue
        if not pod.get("metrics_port"):
            return None
        host = pod["address"].rsplit(":", 1)[0]
        text = httpx.get(f"http://{host}:{pod['metrics_port']}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('pdserve:kv_transfer_bytes_total{role="decode"}'):
                total_bytes += float(line.split()[-1])
            elif line.startswith('pdserve:kv_transfer_blocks_total{role="decode"}'):
                total_blocks += float(line.split()[-1])
    return total_bytes, total_blocks


# -- statistics -----------------------------------------------------------------------------

def summarize(runs: list[ModeRun]) -> dict[str, float]:
    """Pools the requests of every repeat of one mode; rates use the summed durations."""
    results = [r for run in runs for r in run.results]
    duration = sum(run.duration for run in runs)
    ok = [r for r in results if r.ok]
    s = summarize_results(results, duration)
    s.update({
        "decode_blocks_leaked": sum(run.blocks_leaked for run in runs),
        # what a transfer of every whole prompt would move (the pre-seam behaviour)
        "prompt_blocks_per_request": sum(-(-r.prompt_len // 16) for r in ok) / max(len(ok), 1),
        "mean_prompt_tokens": sum(r.prompt_len for r in ok) / max(len(ok), 1),
    })
    if all(run.kv_bytes is not None for run in runs):
        s["kv_kib_per_request"] = sum(run.kv_bytes or 0 for run in runs) / 1024 / max(
            len(results), 1)
        s["kv_blocks_per_request"] = sum(run.kv_blocks or 0 for run in runs) / max(
            len(results), 1)
    for who in ("servers", "client", "others"):  # average cores busy while measuring
        s[f"cores_{who}"] = sum(run.cpu_s[who] for run in runs) / duration
    return s


ROWS = [
    ("completed / failed", None),
    ("mean TTFT (ms)", "mean_ttft_ms"), ("median TTFT (ms)", "p50_ttft_ms"),
    ("p99 TTFT (ms)", "p99_ttft_ms"),
    ("mean ITL (ms)", "mean_itl_ms"), ("median ITL (ms)", "p50_itl_ms"),
    ("p99 ITL (ms)", "p99_itl_ms"),
    ("mean TPOT (ms)", "mean_tpot_ms"), ("median E2E latency (ms)", "p50_e2e_ms"),
    ("output tokens/s", "output_throughput"), ("requests/s", "request_throughput"),
    ("tokens in first chunk (mean)", "first_chunk_tokens_mean"),
    ("mean prompt tokens", "mean_prompt_tokens"),
    ("prompt blocks per request", "prompt_blocks_per_request"),
    ("KV blocks received per request", "kv_blocks_per_request"),
    ("KV KiB received per request", "kv_kib_per_request"),
    ("cores busy: servers", "cores_servers"), ("cores busy: this client", "cores_client"),
    ("cores busy: other processes", "cores_others"),
]


def format_table(summaries: dict[str, dict[str, float]]) -> str:
    """Markdown table: a column per mode, plus disaggregated/colocated when both ran."""
    modes = list(summaries)
    ratio = "colocated" in summaries and "disaggregated" in summaries
    head = ["metric", *modes] + (["disagg / coloc"] if ratio else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in ROWS:
        if key is None:
            cells = [f"{int(s['completed'])} / {int(s['failed'])}" for s in summaries.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + (" | |" if ratio else " |"))
            continue
        cells = [f"{summaries[m][key]:.2f}" if key in summaries[m] else "-" for m in modes]
        if ratio:
            base = summaries["colocated"].get(key)
            other = summaries["disaggregated"].get(key)
            cells.append(f"{other / base:.2f}x" if base and other is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- CPU accounting (who else used the two cores while we measured) -------------------------

def _proc_cpu_s() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user+system CPU seconds) of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def _tree_cpu_s(root: int) -> float:
    table = _proc_cpu_s()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(table[pid][1] for pid in tree if pid in table)


def _machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- one mode, end to end -------------------------------------------------------------------

@dataclass(slots=True)
class ModeRun:
    results: list[RequestResult]
    duration: float
    cpu_s: dict[str, float]  # servers / client / others, during the measured workload
    blocks_leaked: int
    kv_bytes: float | None = None  # KV the decode pods received during the workload
    kv_blocks: float | None = None


def bench_mode(args: argparse.Namespace, mode: str, items: list[WorkItem],
               warm: list[WorkItem], log_path: Path) -> ModeRun:
    server = Server(str(args.model), mode, args.pod_args, args.pod_threads, log_path,
                    args.tree)
    try:
        server.wait_ready()
        model, pods = asyncio.run(served_model(server.url))
        free_before = {p["address"]: p["free_blocks"] for p in pods if p["role"] == "decode"}
        if warm:  # not measured: first forwards of each shape, gRPC channels, KV sockets
            asyncio.run(run_workload(Target(server.url, model), warm, args.concurrency))
        kv0 = kv_received(pods)
        cpu0 = (_tree_cpu_s(server.proc.pid), time.process_time(), _machine_busy_s())
        results, duration = asyncio.run(
            run_workload(Target(server.url, model), items, args.concurrency))
        servers, client, busy = (_tree_cpu_s(server.proc.pid) - cpu0[0],
                                 time.process_time() - cpu0[1], _machine_busy_s() - cpu0[2])
        cpu = {"servers": servers, "client": client, "others": max(busy - servers - client, 0)}
        time.sleep(0.5)  # let the router poll the pods' freed blocks
        _, pods = asyncio.run(served_model(server.url))
        free_after = {p["address"]: p["free_blocks"] for p in pods if p["role"] == "decode"}
        leaked = sum(free_before[a] - free_after.get(a, 0) for a in free_before)
        kv1 = kv_received(pods)
        run = ModeRun(results, duration, cpu, leaked)
        if kv0 is not None and kv1 is not None:
            run.kv_bytes, run.kv_blocks = kv1[0] - kv0[0], kv1[1] - kv0[1]
        return run
    finally:
        server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="HF-format model directory")
    p.add_argument("--modes", default="colocated,disaggregated",
                   help="comma-separated, run in this order: colocated, disaggregated")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s (inf: all at once)")
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    p.add_argument("--input-len", type=parse_range, default=parse_length("64-512"),
                   help="N, LO-HI or lognormal:MEDIAN,SIGMA[,LO-HI] tokens")
    p.add_argument("--output-len", type=parse_range, default=parse_length("64"),
                   help="like --input-len")
    p.add_argument("--turns", type=int, default=1,
                   help="turns per session (> 1: a multi-turn chat workload)")
    p.add_argument("--turn-len", type=parse_range, default=parse_length("64"),
                   help="new tokens per later turn, N or LO-HI")
    p.add_argument("--tree", type=Path, default=REPO,
                   help="the source tree whose `pdserve up` is measured (default: this one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the modes this many times, alternating; requests are pooled")
    p.add_argument("--warmup", type=int, default=16,
                   help="unmeasured requests per mode, drawn like the workload (other seed)")
    p.add_argument("--pod-args", default="", help="passed to pdserve up --pod-args")
    p.add_argument("--pod-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every pod (default: torch's own choice)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="where server logs go (default: a temporary folder)")
    p.add_argument("--out-json", type=Path, default=None,
                   help="write the settings, summaries and per-request results here")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: not a model directory (no config.json)")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODE_ARGS]
    if unknown or not args.modes:
        p.error(f"--modes: unknown {unknown}; choose from {list(MODE_ARGS)}")
    if min(args.num_requests, args.concurrency, args.repeats) < 1 or args.rate <= 0:
        p.error("--num-requests, --concurrency, --repeats and --rate must be positive")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = json.loads((args.model / "config.json").read_text())
    items = workload(args.seed, args.num_requests, args.input_len, args.output_len,
                     config["vocab_size"], args.rate, args.turns, args.turn_len)
    warm = workload(args.seed + 1, args.warmup, args.input_len, LengthDist("fixed", 16, 16),
                    config["vocab_size"], float("inf")) if args.warmup else []
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so bench_mode's finally stops the servers
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (`cmd &`)
    print(f"model {args.model}: {config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, heads {config['num_attention_heads']}/"
          f"{config['num_key_value_heads']}, vocab {config['vocab_size']}; "
          f"{len(items)} requests, input {args.input_len.describe()}, output "
          f"{args.output_len.describe()}, "
          f"rate {args.rate}, concurrency {args.concurrency}, seed {args.seed}, "
          f"turns {args.turns} (+{args.turn_len.describe()} tokens each), tree {args.tree}, "
          f"{args.repeats} repeat(s); {os.cpu_count()} CPUs; server logs in {log_dir}",
          flush=True)
    runs: dict[str, list[ModeRun]] = {m: [] for m in args.modes}
    try:
        for rep in range(args.repeats):  # modes alternate so slow drift hits both alike
            for mode in args.modes:
                run = bench_mode(args, mode, items, warm, log_dir / f"{mode}-{rep}.log")
                runs[mode].append(run)
                failed = [r.error for r in run.results if not r.ok]
                out = sum(r.output_tokens for r in run.results if r.ok)
                print(f"[{mode} #{rep}] {len(run.results) - len(failed)} ok, {len(failed)} "
                      f"failed in {run.duration:.2f} s, {out / run.duration:.1f} output tok/s;"
                      f" cores busy: servers {run.cpu_s['servers'] / run.duration:.2f}, "
                      f"others {run.cpu_s['others'] / run.duration:.2f}; decode blocks "
                      f"leaked: {run.blocks_leaked}", flush=True)
                for err in failed:
                    print(f"    failed: {err}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summaries = {mode: summarize(mode_runs) for mode, mode_runs in runs.items()}
    print()
    print(format_table(summaries))
    if args.out_json:
        settings = {k: (str(v) if isinstance(v, Path) or v == float("inf") else
                        v.describe() if isinstance(v, LengthDist) else v)
                    for k, v in vars(args).items()}  # JSON has no inf
        args.out_json.write_text(json.dumps(
            {"settings": settings, "model_config": config, "summaries": summaries,
             "runs": {m: [asdict(r) for r in rs] for m, rs in runs.items()}}, indent=1))
    failed = sum(int(s["failed"]) + int(s["decode_blocks_leaked"]) for s in summaries.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
