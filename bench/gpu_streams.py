"""Does the serving loop keep the GPU busy? (issue 9)

Two figures from one run on the same GPU:
1. the decode step alone: the 8B-shaped model's CUDA-graph decode step at batch ``--streams``
   with the context at the middle of the run (input + output/2), median of 20 -- the
   tokens/s the decode pod could reach if host work cost nothing;
2. served: ``pdserve up --device cuda`` (1 prefill pod on cuda:0, 1 decode pod on cuda:1,
   ``--connector``), ``--streams`` concurrent streamed completions of ``--input-len`` random
   token ids and ``--output-len`` tokens (ignore_eos), read by several client processes so the
   client is not the bottleneck. The decode rate is the tokens that arrived while every
   stream was decoding (from the last first token to the first last token) over that time.

    python3 bench/gpu_streams.py --model /tmp/m8b --streams 64 --input-len 128 --output-len 512
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def graph_step_seconds(model_dir: Path, batch: int, ctx: int) -> float:
    """The decode pod's own model, weights and graphs, timed without any serving."""
    import torch

    from engine import LLM

    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_num_seqs=batch,
              max_model_len=ctx + 64)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs is not None, "CUDA graphs are off"
    from gpu_engine import decode_inputs

    block = runner.block_size
    per_seq = (ctx + 64 + block - 1) // block
    ids, pos, attn = decode_inputs(batch, ctx, block, per_seq, runner.cfg.vocab_size)
    times = []
    with torch.inference_mode():
        for i in range(25):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs.run(ids, pos, attn).argmax(-1)
            e.record()
            e.synchronize()
            if i >= 5:
                times.append(a.elapsed_time(e) / 1e3)
    del llm
    torch.cuda.empty_cache()
    return statistics.median(times)


def _client(url: str, model: str, prompts: list[list[int]], output_len: int, q: Any) -> None:
    import asyncio

    import httpx

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> list[tuple[float, int]]:
        body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        marks = []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    n = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
                    marks.append((time.monotonic(), n))
        return marks

    async def main() -> list[list[tuple[float, int]]]:
        limits = httpx.Limits(max_connections=len(prompts) + 4)
        async with httpx.AsyncClient(timeout=240, limits=limits) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    q.put(asyncio.run(main()))


def served_rate(url: str, model: str, streams: int, input_len: int, output_len: int,
                vocab: int, clients: int) -> dict[str, float]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(input_len)]
               for _ in range(streams)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, model, prompts[i::clients], output_len, q))
             for i in range(clients)]
    for p in procs:
        p.start()
    marks = []
    deadline = time.monotonic() + 300
    while len(marks) < streams:  # a client that died (its traceback is above) ends the run
        try:
            marks += q.get(timeout=1)
        except Exception:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a client failed or the streams took over 300 s") from None
    for p in procs:
        p.join(30)
    tokens = [sum(n for _, n in m) for m in marks]
    first = max(next(t for t, n in m if n) for m in marks)
    last = min(m[-1][0] for m in marks)
    inside = sum(n for m in marks for t, n in m if first < t <= last)
    return {"tokens_per_stream_min": min(tokens), "window_s": last - first,
            "decode_tok_s": inside / (last - first)}


def start_profiles(out: Path, delay_s: int, seconds: int,
                   roles: tuple[str, ...] = ("decode", "router")) -> list[subprocess.Popen]:
    """py-spy (when on PATH) samples the pods of ``roles`` for ``seconds`` after
    ``delay_s``: raw collapsed stacks in ``out`` (bench/py_spy_summary.py reads them)."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("no py-spy on PATH: no profile", flush=True)
        return []
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for role in roles:
        pids = subprocess.run(["pgrep", "-f", f"pdserve.cli {role} "], capture_output=True,
                              text=True).stdout.split()
        if not pids:
            continue
        procs.append(subprocess.Popen(
            ["bash", "-c", f"sleep {delay_s}; exec {spy} record -p {pids[0]} -d {seconds} "
             f"-r 200 -f raw --nonblocking -o {out / (role + '.txt')} "
             f"> {out / (role + '.err')} 2>&1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--connector", default="ucx")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--pod-args", default="--max-num-batched-tokens 8192")
    p.add_argument("--port", type=int, default=8460)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", type=Path, default=None,
                   help="folder for py-spy profiles of the decode pod and the router")
    args = p.parse_args()
    from gpu_serving import start, stop

    config = json.loads((args.model / "config.json").read_text())
    ctx = args.input_len + args.output_len // 2
    log = Path("/tmp/pdserve-gpu-logs")
    log.mkdir(parents=True, exist_ok=True)
    # Served first: the pods are gone (their GPU memory with them) before this process
    # loads the model for the step alone.
    proc, url = start(str(args.model), args.connector, args.port, args.pod_args, False,
                      log / f"streams-{args.connector}.log")
    print(f"pdserve up ready at {url}", flush=True)
    try:
        import httpx

        base = url.rstrip("/").removesuffix("/v1")  # start() gives the API's /v1 URL
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        served_rate(url, model, 8, args.input_len, 16, config["vocab_size"], 1)  # warm up
        print("warmed up", flush=True)
        spies = start_profiles(args.profile, 2, 3) if args.profile else []
        served = served_rate(url, model, args.streams, args.input_len, args.output_len,
                             config["vocab_size"], args.clients)
        print(f"served: {served}", flush=True)
        for spy in spies:
            spy.wait(30)
    finally:
        stop(proc)
    step = graph_step_seconds(args.model, args.streams, ctx)
    alone = args.streams / step
    print(f"graph step alone: batch {args.streams}, ctx {ctx}: {step * 1e3:.2f} ms "
          f"= {alone:.0f} tok/s", flush=True)
    served["graph_step_ms"] = step * 1e3
    served["graph_alone_tok_s"] = alone
    served["share"] = served["decode_tok_s"] / alone
    print(f"served: {served['decode_tok_s']:.0f} tok/s over {served['window_s']:.1f} s = "
          f"{100 * served['share']:.0f}% of the graph step alone "
          f"(min tokens per stream {served['tokens_per_stream_min']})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(served, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
