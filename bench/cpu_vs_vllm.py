"""pdserve beside vLLM's CPU build on one machine, the same model and the same guidellm load
(issue 15).

Every system is started once and warmed up with a few unmeasured requests; then, for
each repeat and each load, guidellm (the client the issue's figures came from) measures
the systems back to back in an order that rotates from load to load, so that drift in
what else the machine runs spreads over all of them. Systems:

- ``vllm``: ``vllm serve`` from its own virtual environment (never a pdserve dependency;
  see ../shared/ENVIRONMENT.md for how it installs), bf16 as it picks on this CPU;
- ``colocated@LABEL`` / ``1p1d@LABEL``: ``pdserve up`` (one decode pod that prefills
  itself / one prefill and one decode pod over tcp) from the source tree ``--tree
  LABEL=DIR`` names (e.g. a checkout of the commit before a change, and this tree).

Loads ``cS:P:O`` (S concurrent streams, P prompt and O output tokens of guidellm's
synthetic text; the chat template adds a few prompt tokens) and ``rR:P:O`` (a constant R
requests/s). For every figure it records the 1-minute load average before and after
(``uptime``) and the CPU time the system's processes used per output token (from /proc),
which, unlike latency, does not depend on what else runs.

    .venv/bin/python bench/cpu_vs_vllm.py --model DIR --tree before=/tmp/before \\
        --tree after=. --systems vllm,colocated@before,colocated@after,1p1d@before,1p1d@after \\
        [--loads c4:64:32,c16:64:32,c4:512:64,c16:512:64,r2:64:32] [--requests 160] \\
        [--repeats 2] [--group-nice -10] [--out-json FILE]
    .venv/bin/python bench/cpu_vs_vllm.py --model DIR --tables-from run1.json run2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

START_TIMEOUT_S = 300.0
RATE_DURATION_S = 20.0  # a constant-rate load runs this long


@dataclass(slots=True)
class Load:
    name: str
    streams: int | None
    rate: float | None
    prompt: int
    output: int

    @classmethod
    def parse(cls, text: str) -> Load:
        kind, prompt, output = text.split(":")
        if kind.startswith("c"):
            return cls(text, int(kind[1:]), None, int(prompt), int(output))
        if kind.startswith("r"):
            return cls(text, None, float(kind[1:]), int(prompt), int(output))
        raise ValueError(f"load {text!r}: expected cS:P:O or rR:P:O")


@dataclass(slots=True)
class Figure:
    system: str
    load: str
    repeat: int
    requests_per_s: float
    output_tok_per_s: float
    ttft_ms_mean: float
    ttft_ms_median: float
    tpot_ms_mean: float
    itl_ms_mean: float
    completed: int
    errored: int
    server_cpu_ms_per_token: float
    loadavg_before: float
    loadavg_after: float
    start_s: float


@dataclass(slots=True)
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    model: str
    start_s: float
    log: Path
    extra: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and all its live descendants."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [p for p, parent in parents.items() if parent == pid]
    return total


def set_group_nice(proc: subprocess.Popen, nice: int | None) -> None:
    """Give a process's session (its scheduler autogroup, when the kernel groups by
    session: /proc/sys/kernel/sched_autogroup_enabled) the niceness ``nice``. Servers and
    the client each run in a session of their own; a negative value lets them win the
    cores from other sessions on a shared machine, the same for every system measured."""
    if nice is None:
        return
    try:
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(nice))
    except OSError as exc:
        print(f"cannot set the autogroup niceness of {proc.pid}: {exc}", file=sys.stderr)


def _wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log: {log}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S:.0f} s; log: {log}")


def start_server(system: str, args: argparse.Namespace, trees: dict[str, Path],
                 log_dir: Path) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / f"{system.replace('@', '-')}-{port}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if system == "vllm":
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
        cmd = [str(Path(args.vllm_venv) / "bin" / "vllm"), "serve", args.model,
               "--max-model-len", "2048", "--port", str(port)]
        cwd = log_dir
    else:
        mode, _, label = system.partition("@")
        tree = trees[label]
        env["PYTHONPATH"] = str(tree)  # that tree's packages shadow the installed ones
        shape = ["--mode", "colocated", "--decode", "1"] if mode == "colocated" else \
            ["--prefill", "1", "--decode", "1"]
        cmd = [sys.executable, "-m", "pdserve.cli", "up", "--model", args.model,
               "--port", str(port), *shape]
        if args.pod_args:
            cmd += ["--pod-args", args.pod_args]
        cwd = tree
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
    set_group_nice(proc, args.group_nice)
    _wait_http(url, proc, log)
    start_s = time.monotonic() - t0
    with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
        model = json.load(r)["data"][0]["id"]
    return Server(system, proc, url, model, start_s, log)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    with contextlib.suppress(ProcessLookupError):  # anything left in its process group
        os.killpg(server.proc.pid, signal.SIGKILL)


def warm_up(server: Server) -> None:
    """A few unmeasured requests: first-call allocations, kernel selection, JIT."""
    def one(words: int, tokens: int) -> None:
        body = json.dumps({"model": server.model, "max_tokens": tokens, "ignore_eos": True,
                           "messages": [{"role": "user", "content": "warm up " * words}]})
        req = urllib.request.Request(server.url + "/v1/chat/completions", body.encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()

    threads = [threading.Thread(target=one, args=(w, t))
               for w, t in [(30, 32)] * 6 + [(250, 64)] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_guidellm(server: Server, load: Load, args: argparse.Namespace, out: Path) -> dict:
    if load.streams is not None:
        profile = f"kind=concurrent,streams={load.streams}"
        count = args.requests
    else:
        rate = load.rate or 1.0
        profile = f"kind=constant,rate={rate}"
        count = max(int(rate * RATE_DURATION_S), 1)
    cmd = [args.guidellm, "run",
           "--backend", f"kind=openai_http,target={server.url},model={server.model}",
           "--tokenizer", f"kind=huggingface_auto,model={args.model}",
           "--profile", profile,
           "--data", (f"kind=synthetic_text,prompt_tokens={load.prompt},"
                      f"output_tokens={load.output}"),
           "--constraint", f"kind=max_requests,count={count}",
           "--output", f"kind=json,path={out}", "--disable-console"]
    client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    set_group_nice(client, args.group_nice)
    _, err = client.communicate(timeout=1800)
    if client.returncode != 0:
        raise RuntimeError(f"guidellm failed ({client.returncode}): {err.decode()[-2000:]}")
    return json.loads(out.read_text())


def figure_of(report: dict, system: str, load: Load, repeat: int, cpu_s: float,
              before: float, after: float, start_s: float) -> Figure:
    m = report["benchmarks"][0]["metrics"]

    def ok(key: str, stat: str = "mean") -> float:
        return float(m[key]["successful"][stat])

    tokens = ok("output_token_count", "total_sum")
    totals = m["request_totals"]
    return Figure(system, load.name, repeat, ok("requests_per_second"),
                  ok("output_tokens_per_second"), ok("time_to_first_token_ms"),
                  ok("time_to_first_token_ms", "median"), ok("time_per_output_token_ms"),
                  ok("inter_token_latency_ms"), int(totals["successful"]),
                  int(totals["errored"]), 1e3 * cpu_s / max(tokens, 1), before, after, start_s)


def measure(server: Server, load: Load, repeat: int, args: argparse.Namespace,
            log_dir: Path) -> Figure:
    before, cpu0 = loadavg(), _tree_cpu_s(server.proc.pid)
    report = run_guidellm(server, load, args,
                          log_dir / f"{server.name}-{load.name}-{repeat}.json")
    cpu_s = _tree_cpu_s(server.proc.pid) - cpu0
    fig = figure_of(report, server.name, load, repeat, cpu_s, before, loadavg(),
                    server.start_s)
    print(f"  {server.name} {load.name} #{repeat}: {fig.requests_per_s:.2f} req/s, TPOT "
          f"{fig.tpot_ms_mean:.2f} ms, TTFT {fig.ttft_ms_mean:.0f} ms, CPU "
          f"{fig.server_cpu_ms_per_token:.2f} ms/token, load avg "
          f"{fig.loadavg_before:.1f}->{fig.loadavg_after:.1f}", flush=True)
    return fig


def _range(xs: list[float], fmt: str) -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(min(xs), fmt)}-{format(max(xs), fmt)}"


def _mean_range(xs: list[float], fmt: str) -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ({_range(xs, fmt)})"


def format_tables(figures: list[Figure], systems: list[str], loads: list[Load]) -> str:
    lines = []
    for load in loads:
        shape = f"{load.streams} streams" if load.streams else f"{load.rate:g} req/s"
        lines += [f"\n**{load.name}** ({shape}, {load.prompt}/{load.output} tokens)\n",
                  ("| system | req/s | output tok/s | TTFT mean ms | TPOT mean ms | ITL mean ms "
                   "| req/s vs vLLM | TPOT vs vLLM | server CPU ms/token | load avg | errors |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        base = [f for f in figures if f.system == "vllm" and f.load == load.name]
        base_rps = statistics.mean(f.requests_per_s for f in base) if base else None
        base_tpot = statistics.mean(f.tpot_ms_mean for f in base) if base else None
        for system in systems:
            fs = [f for f in figures if f.system == system and f.load == load.name]
            if not fs:
                continue
            rps = [f.requests_per_s for f in fs]
            tpot = [f.tpot_ms_mean for f in fs]
            vs_rps = "" if not base_rps else f"{statistics.mean(rps) / base_rps:.2f}x"
            vs_tpot = "" if not base_tpot else f"{statistics.mean(tpot) / base_tpot:.2f}x"
            loads_seen = [f.loadavg_before for f in fs] + [f.loadavg_after for f in fs]
            lines.append(  # ratios are of the means; ranges are over the repeats
                f"| {system} | {_mean_range(rps, '.1f')} | "
                f"{_range([f.output_tok_per_s for f in fs], '.0f')} | "
                f"{_range([f.ttft_ms_mean for f in fs], '.0f')} | {_mean_range(tpot, '.1f')} | "
                f"{_range([f.itl_ms_mean for f in fs], '.1f')} | {vs_rps} | {vs_tpot} | "
                f"{_range([f.server_cpu_ms_per_token for f in fs], '.2f')} | "
                f"{_range(loads_seen, '.1f')} | {sum(f.errored for f in fs)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--systems", default="vllm,colocated@after,1p1d@after")
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=DIR: a pdserve source tree (default after=this tree)")
    ap.add_argument("--loads", default="c4:64:32,c16:64:32,c4:512:64,c16:512:64,r2:64:32")
    ap.add_argument("--requests", type=int, default=160, help="per concurrent load")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pod-args", default="", help="passed to pdserve up --pod-args")
    ap.add_argument("--vllm-venv", default="/work/vllm-venv")
    ap.add_argument("--guidellm", default="/work/guidellm-venv/bin/guidellm")
    ap.add_argument("--group-nice", type=int, default=None,
                    help="niceness of the servers' and the client's scheduler groups "
                         "(e.g. -10 on a shared machine; see set_group_nice)")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--tables-from", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: print the tables of figures saved by --out-json "
                         "(several files are pooled as more repeats)")
    args = ap.parse_args()
    if args.tables_from:
        saved = [Figure(**f) for path in args.tables_from
                 for f in json.loads(Path(path).read_text())]
        seen_systems = list(dict.fromkeys(f.system for f in saved))
        seen_loads = [Load.parse(x) for x in dict.fromkeys(f.load for f in saved)]
        print(format_tables(saved, seen_systems, seen_loads))
        return 0

    trees = {"after": Path(__file__).resolve().parents[1]}
    for item in args.tree:
        label, _, path = item.partition("=")
        trees[label] = Path(path).resolve()
    systems = args.systems.split(",")
    loads = [Load.parse(x) for x in args.loads.split(",")]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="cpu-vs-vllm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; logs in {log_dir}; load average now {loadavg():.2f}; "
          f"group niceness {args.group_nice}", flush=True)
    figures: list[Figure] = []
    servers: dict[str, Server] = {}
    try:
        # Every system runs for the whole measurement (an idle one uses ~1% of a core), so
        # that each load can be measured on all of them back to back, in rotating order:
        # what else the machine runs drifts over minutes, and this spreads it evenly.
        for system in systems:
            servers[system] = start_server(system, args, trees, log_dir)
            warm_up(servers[system])
            print(f"[{system}] up in {servers[system].start_s:.1f} s", flush=True)
        for repeat in range(args.repeats):
            for i, load in enumerate(loads):
                k = (repeat + i) % len(systems)
                for system in systems[k:] + systems[:k]:
                    figures.append(measure(servers[system], load, repeat, args, log_dir))
    finally:
        for server in servers.values():
            stop_server(server)
    print(format_tables(figures, systems, loads))
    starts = {s: [f.start_s for f in figures if f.system == s] for s in systems}
    print("\nstart-up s: " + ", ".join(f"{s} {_range(v, '.1f')}" for s, v in starts.items()))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps([asdict(f) for f in figures], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
