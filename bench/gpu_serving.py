"""Serving on GPUs through ``pdserve up --device cuda``: exactness and time to first token,
colocated against disaggregated over each connector, on the same GPUs in the same run.

For each system (colocated: one pod on cuda:1; disaggregated: prefill on cuda:0, decode on
cuda:1, or both on cuda:0 with ``--same-gpu``) it starts ``pdserve up``, then:
- greedy completions of seeded random token-id prompts; their tokens must equal the
  colocated system's (the reference of the GPU path);
- TTFT of fresh prompts (never cached) of each length in ``--ttft-lens``, streamed, the
  median of ``--repeats``; for a disaggregated system also the transfer's exposed share of
  TTFT: the prefill pod's ``pdserve:kv_transfer_exposed_seconds`` for that request (time
  after its last layer's compute until the decode pod had everything) over its TTFT.

    PYTHONPATH=. python3 bench/gpu_serving.py --model /tmp/m8b --systems colocated,nccl,ucx
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"OpenAI API at (http://\S+)/v1")


def start(model: str, system: str, port: int, pod_args: str, same_gpu: bool,
          log: Path) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "pdserve.cli", "up", "--model", model, "--port", str(port),
            "--device", "cuda", "--pod-args", pod_args]
    if system == "colocated":
        argv += ["--mode", "colocated", "--decode", "1", "--decode-gpus", "0" if same_gpu else "1"]
    else:
        argv += ["--prefill", "1", "--decode", "1", "--connector", system]
        if same_gpu:
            argv += ["--prefill-gpus", "0", "--decode-gpus", "0"]
    out = open(log, "w")  # noqa: SIM115 -- the pod writes it until stop()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{system}: pdserve up did not start:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def completion(url: str, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def ttft(url: str, model: str, prompt: list[int]) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token came back")


def prefill_metric(url: str, name: str) -> float:
    pods = httpx.get(f"{url}/pools", timeout=30).json()["pods"]
    total = 0.0
    for pod in pods:
        if pod["pool"] != "prefill" or not pod.get("metrics_port"):
            continue
        host = pod["address"].rsplit(":", 1)[0]
        text = httpx.get(f"http://{host}:{pod['metrics_port']}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(name):
                total += float(line.split()[-1])
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--systems", default="colocated,nccl,ucx")
    p.add_argument("--same-gpu", action="store_true")
    p.add_argument("--exact-prompts", type=int, default=8)
    p.add_argument("--exact-tokens", type=int, default=32)
    p.add_argument("--ttft-lens", default="1024,8192,32768")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pod-args", default="--max-num-batched-tokens 8192")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/pdserve-gpu-logs"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = min(config["vocab_size"], 32000)
    rng = random.Random(0)
    exact_prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(100, 1000))]
                     for _ in range(args.exact_prompts)]
    lens = [int(x) for x in args.ttft_lens.split(",") if x]
    results: dict[str, Any] = {}
    reference: list[list[int]] | None = None
    for system in [s for s in args.systems.split(",") if s]:
        proc, url = start(args.model, system, args.port, args.pod_args, args.same_gpu,
                          args.log_dir / f"{system}.log")
        try:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            tokens = [completion(url, model, pr, args.exact_tokens) for pr in exact_prompts]
            if reference is None:
                reference = tokens
            same = sum(a == b for a, b in zip(tokens, reference, strict=True))
            row: dict[str, Any] = {"exact": f"{same}/{len(tokens)}"}
            for n in lens:
                times, exposed = [], []
                for _ in range(args.repeats + 1):
                    prompt = [rng.randrange(4, vocab) for _ in range(n)]  # never cached
                    before = prefill_metric(url, "pdserve:kv_transfer_exposed_seconds_sum")
                    t = ttft(url, model, prompt)
                    times.append(t)
                    exposed.append(prefill_metric(
                        url, "pdserve:kv_transfer_exposed_seconds_sum") - before)
                times, exposed = times[1:], exposed[1:]  # the first of each length warms up
                row[f"ttft_ms_{n}"] = 1e3 * statistics.median(times)
                if system != "colocated":
                    row[f"exposed_ms_{n}"] = 1e3 * statistics.median(exposed)
                    row[f"exposed_share_{n}"] = statistics.median(
                        e / t for e, t in zip(exposed, times, strict=True))
            results[system] = row
            print(system, json.dumps(row), flush=True)
        finally:
            stop(proc)
    print("\n| system | exact vs colocated | " + " | ".join(
        f"TTFT {n} (ms) | exposed {n}" for n in lens) + " |")
    for system, row in results.items():
        cells = [row["exact"]]
        for n in lens:
            share = row.get(f"exposed_share_{n}")
            cells += [f"{row[f'ttft_ms_{n}']:.1f}",
                      f"{row[f'exposed_ms_{n}']:.2f} ms ({100 * share:.2f}%)"
                      if share is not None else "-"]
        print(f"| {system} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["exact"].split("/")[0] == r["exact"].split("/")[1]
                    for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
