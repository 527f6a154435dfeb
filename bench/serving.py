"""Serving benchmark: TTFT, inter-token latency and throughput, colocated vs disaggregated.

Like vLLM's benchmark_serving, but it also runs the servers, from the tree this file lives
in: for each mode it starts ``pdserve up`` (colocated: ``--mode colocated --decode 1``;
disaggregated: ``--prefill 1 --decode 1``), warms it up, sends the same seeded workload over
the OpenAI streaming API (``/v1/completions``, token-id prompts so prompt lengths are exact,
``ignore_eos`` so output lengths are exact), stops it, and prints one table with every mode
and the ratio disaggregated / colocated. ``--repeats`` alternates the modes and pools::

    .venv/bin/python bench/serving.py --model models/default \\
        --num-requests 64 --input-len 64-512 --output-len 64 --rate 8 --concurrency 16

Per request, at the client, from the moment it is sent: TTFT is the time to the first
chunk carrying a token; ITL is the gap between token-carrying chunks (vLLM's definition);
TPOT is (end-to-end - TTFT) / (output tokens - 1). Chunks' token counts come from
``return_token_ids``, so a first chunk carrying two tokens shows. CPU seconds of the server
processes, this client and everything else (from /proc) show a run disturbed by other work.
Servers are always stopped: on exit, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 600.0
MODE_ARGS = {
    "colocated": ["--mode", "colocated", "--decode", "1"],
    "disaggregated": ["--prefill", "1", "--decode", "1"],
}


@dataclass(slots=True)
class WorkItem:
    prompt: list[int]
    max_tokens: int
    send_at: float  # seconds after the start of the run


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    first_chunk_tokens: int = 0


# -- workload -------------------------------------------------------------------------------

def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"bad range {text!r} (want N or LO-HI, 1 <= LO <= HI)")
    return lo_i, hi_i


def build_workload(seed: int, n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   vocab: int, rate: float) -> list[WorkItem]:
    """Random token-id prompts; Poisson arrivals at ``rate`` req/s (inf: all at time 0)."""
    rng = random.Random(seed)
    items, t = [], 0.0
    for _ in range(n):
        # ids below 4 are the toy tokenizers' special tokens; real text never needs them
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(*input_len))]
        items.append(WorkItem(prompt, rng.randint(*output_len), t))
        if rate != float("inf"):
            t += rng.expovariate(rate)
    return items


# -- the server under test ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``pdserve up`` process (which owns its pods); its output goes to ``log_path``."""

    def __init__(self, model: str, mode: str, pod_args: str, pod_threads: int | None,
                 log_path: Path) -> None:
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
        self._log: IO[str] = open(log_path, "w")
        self._ready = threading.Event()
        # own session: a terminal Ctrl-C reaches only us, and we stop the fleet in order
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
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


# -- the client -----------------------------------------------------------------------------

async def send_one(client: httpx.AsyncClient, url: str, model: str, item: WorkItem
                   ) -> RequestResult:
    res = RequestResult(prompt_len=len(item.prompt))
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            usage_tokens = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                n = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
                if n == 0:
                    continue
                now = time.perf_counter()
                if res.output_tokens == 0:
                    res.ttft, res.first_chunk_tokens = now - start, n
                else:
                    res.itls.append(now - last)
                last = now
                res.output_tokens += n
            res.e2e = time.perf_counter() - start
            if usage_tokens is not None and usage_tokens != res.output_tokens:
                res.error = f"streamed {res.output_tokens} tokens but usage says {usage_tokens}"
            elif res.output_tokens != item.max_tokens:
                res.error = f"got {res.output_tokens} tokens, asked {item.max_tokens}"
            else:
                res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_workload(url: str, model: str, items: list[WorkItem], concurrency: int
                       ) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(item: WorkItem) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + item.send_at - time.perf_counter()))
            async with limit:
                return await send_one(client, url, model, item)

        results = await asyncio.gather(*(one(i) for i in items))
        return list(results), time.perf_counter() - t0


async def served_model(url: str) -> tuple[str, list[dict]]:
    async with httpx.AsyncClient(timeout=10) as client:
        models = (await client.get(f"{url}/v1/models")).json()["data"]
        pods = (await client.get(f"{url}/pools")).json()["pods"]
        return models[0]["id"], pods


# -- statistics -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(runs: list[ModeRun]) -> dict[str, float]:
    """Pools the requests of every repeat of one mode; rates use the summed durations."""
    results = [r for run in runs for r in run.results]
    duration = sum(run.duration for run in runs)
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    s: dict[str, float] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": sum(r.prompt_len for r in ok), "output_tokens": out_tokens,
        "requests_per_s": len(ok) / duration, "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_len for r in ok)) / duration,
        "first_chunk_tokens_mean": sum(r.first_chunk_tokens for r in ok) / max(len(ok), 1),
        "decode_blocks_leaked": sum(run.blocks_leaked for run in runs),
    }
    for who in ("servers", "client", "others"):  # average cores busy while measuring
        s[f"cores_{who}"] = sum(run.cpu_s[who] for run in runs) / duration
    series = {
        "ttft_ms": [r.ttft * 1e3 for r in ok],
        "itl_ms": [x * 1e3 for r in ok for x in r.itls],
        "tpot_ms": [(r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1)
                    for r in ok if r.output_tokens > 1],
        "e2e_ms": [r.e2e * 1e3 for r in ok],
    }
    for name, xs in series.items():
        s[f"mean_{name}"] = sum(xs) / len(xs) if xs else float("nan")
        s[f"median_{name}"] = percentile(xs, 50)
        s[f"p99_{name}"] = percentile(xs, 99)
    return s


ROWS = [
    ("completed / failed", None),
    ("mean TTFT (ms)", "mean_ttft_ms"), ("median TTFT (ms)", "median_ttft_ms"),
    ("p99 TTFT (ms)", "p99_ttft_ms"),
    ("mean ITL (ms)", "mean_itl_ms"), ("median ITL (ms)", "median_itl_ms"),
    ("p99 ITL (ms)", "p99_itl_ms"),
    ("mean TPOT (ms)", "mean_tpot_ms"), ("median E2E latency (ms)", "median_e2e_ms"),
    ("output tokens/s", "output_tokens_per_s"), ("requests/s", "requests_per_s"),
    ("tokens in first chunk (mean)", "first_chunk_tokens_mean"),
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
        cells = [f"{summaries[m][key]:.2f}" for m in modes]
        if ratio:
            base = summaries["colocated"][key]
            cells.append(f"{summaries['disaggregated'][key] / base:.2f}x" if base else "-")
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


def bench_mode(args: argparse.Namespace, mode: str, items: list[WorkItem],
               warm: list[WorkItem], log_path: Path) -> ModeRun:
    server = Server(str(args.model), mode, args.pod_args, args.pod_threads, log_path)
    try:
        server.wait_ready()
        model, pods = asyncio.run(served_model(server.url))
        free_before = {p["address"]: p["free_blocks"] for p in pods if p["role"] == "decode"}
        if warm:  # not measured: first forwards of each shape, gRPC channels, KV sockets
            asyncio.run(run_workload(server.url, model, warm, args.concurrency))
        cpu0 = (_tree_cpu_s(server.proc.pid), time.process_time(), _machine_busy_s())
        results, duration = asyncio.run(
            run_workload(server.url, model, items, args.concurrency))
        servers, client, busy = (_tree_cpu_s(server.proc.pid) - cpu0[0],
                                 time.process_time() - cpu0[1], _machine_busy_s() - cpu0[2])
        cpu = {"servers": servers, "client": client, "others": max(busy - servers - client, 0)}
        time.sleep(0.5)  # let the router poll the pods' freed blocks
        _, pods = asyncio.run(served_model(server.url))
        free_after = {p["address"]: p["free_blocks"] for p in pods if p["role"] == "decode"}
        leaked = sum(free_before[a] - free_after.get(a, 0) for a in free_before)
        return ModeRun(results, duration, cpu, leaked)
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
    p.add_argument("--input-len", type=parse_range, default=(64, 512), help="N or LO-HI tokens")
    p.add_argument("--output-len", type=parse_range, default=(64, 64), help="N or LO-HI tokens")
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
    items = build_workload(args.seed, args.num_requests, args.input_len, args.output_len,
                           config["vocab_size"], args.rate)
    warm = build_workload(args.seed + 1, args.warmup, args.input_len, (16, 16),
                          config["vocab_size"], float("inf")) if args.warmup else []
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so bench_mode's finally stops the servers
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (`cmd &`)
    print(f"model {args.model}: {config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, heads {config['num_attention_heads']}/"
          f"{config['num_key_value_heads']}, vocab {config['vocab_size']}; "
          f"{len(items)} requests, input {args.input_len}, output {args.output_len}, "
          f"rate {args.rate}, concurrency {args.concurrency}, seed {args.seed}, "
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
        settings = {k: (str(v) if isinstance(v, Path) or v == float("inf") else v)
                    for k, v in vars(args).items()}  # JSON has no inf
        args.out_json.write_text(json.dumps(
            {"settings": settings, "model_config": config, "summaries": summaries,
             "runs": {m: [asdict(r) for r in rs] for m, rs in runs.items()}}, indent=1))
    failed = sum(int(s["failed"]) + int(s["decode_blocks_leaked"]) for s in summaries.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
