"""CPU profile of the serving path's engine step (issue 15): where a step's time goes.

Runs an ``LLMEngine`` in this process (the engine a pod runs, without gRPC or HTTP around
it) on a fixed workload -- ``--requests`` prompts of ``--input-len`` random tokens, each
generating exactly ``--output-len`` tokens, ``--streams`` in flight (a new one joins as
soon as one finishes, as under a concurrent load generator) -- and prints:

- the engine's own requests/s and output tokens/s: the ceiling the serving stack around
  it can reach;
- the median and p90 wall time of steps that prefill something and of decode-only steps,
  and the thread CPU time of decode-only steps;
- with ``--torch-profile``: torch.profiler's table of the operators of the decode steps
  (self CPU time, calls), i.e. which kernels cost what;
- with ``--python-profile``: cProfile's top functions by cumulative time over the decode
  steps, i.e. how much is Python around the kernels (scheduler, prepare, sampler).

It measures the tree it lives in, so the same command before and after a change shows
what moved:

    .venv/bin/python bench/cpu_profile.py --model DIR [--streams 16] [--requests 64]
        [--input-len 64] [--output-len 32] [--dtype auto] [--threads N] [--torch-profile]
        [--python-profile]

For the whole serving path under load (gRPC and HTTP included), run ``py-spy record -p
PID`` on a decode pod while bench/serving.py drives it (py-spy is not a dependency).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.llm_engine import EngineArgs, LLMEngine
from engine.sampling_params import SamplingParams


def _engine(args: argparse.Namespace) -> LLMEngine:
    extra = {"cpu_threads": args.threads} if args.threads else {}
    return LLMEngine(args.model, EngineArgs(dtype=args.dtype, num_kv_blocks=args.kv_blocks,
                                            **extra))


@dataclass(slots=True)
class StepTimes:
    decode_ms: list[float] = field(default_factory=list)  # steps of single-token seqs only
    decode_cpu_ms: list[float] = field(default_factory=list)  # their thread CPU time
    decode_batch: list[int] = field(default_factory=list)
    mixed_ms: list[float] = field(default_factory=list)  # steps that prefill something
    tokens: int = 0
    wall_s: float = 0.0


def _prompts(engine: LLMEngine, args: argparse.Namespace, n: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    vocab = engine.config.vocab_size
    return [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(n)]


def _serve(engine: LLMEngine, args: argparse.Namespace, tag: str, total: int,
           times: StepTimes | None) -> None:
    """``total`` requests with at most ``--streams`` in flight: a new one is added as soon
    as one finishes, as a concurrent load generator does."""
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    prompts = _prompts(engine, args, total)
    sent = 0
    t_start = time.perf_counter()
    while sent < total or engine.has_work():
        while sent < total and len(engine.requests) < args.streams:
            engine.add_request(f"{tag}-{sent}", prompts[sent], params)
            sent += 1
        running = engine.scheduler.running
        is_decode = not engine.scheduler.waiting and all(
            s.num_computed_tokens == s.num_tokens - 1 for s in running)
        batch = len(running)
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        ms = (time.perf_counter() - t0) * 1e3
        if times is None:
            continue
        times.tokens += sum(len(d.token_ids) for o in outputs for d in o.deltas)
        if is_decode:
            times.decode_ms.append(ms)
            times.decode_cpu_ms.append((time.thread_time() - c0) * 1e3)
            times.decode_batch.append(batch)
        else:
            times.mixed_ms.append(ms)
    if times is not None:
        times.wall_s += time.perf_counter() - t_start


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=16, help="requests in flight")
    ap.add_argument("--requests", type=int, default=64, help="requests measured")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="cpu_threads (0: the default)")
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--python-profile", action="store_true")
    ap.add_argument("--rows", type=int, default=25, help="rows of each profile table")
    args = ap.parse_args()

    t0 = time.perf_counter()
    engine = _engine(args)
    load_s = time.perf_counter() - t0
    _serve(engine, args, "warm", args.streams, None)  # first-call allocations, oneDNN caches

    times = StepTimes()
    prof = None
    pyprof = cProfile.Profile() if args.python_profile else None
    if args.torch_profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    if pyprof is not None:
        pyprof.enable()
    _serve(engine, args, "run", args.requests, times)
    if pyprof is not None:
        pyprof.disable()
    if prof is not None:
        prof.__exit__(None, None, None)

    print(f"model {args.model}: dtype {engine.runner.dtype}, torch threads "
          f"{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"load {load_s:.2f} s")
    print(f"workload: {args.requests} requests of {args.input_len} prompt / "
          f"{args.output_len} output tokens, {args.streams} in flight")
    print(f"engine alone: {args.requests / times.wall_s:.2f} requests/s, "
          f"{times.tokens / times.wall_s:.0f} output tokens/s")
    print("| step | count | median ms | p90 ms |\n|---|---|---|---|")
    if times.mixed_ms:
        print(f"| with a prefill | {len(times.mixed_ms)} | "
              f"{statistics.median(times.mixed_ms):.2f} | {_pct(times.mixed_ms, 0.9):.2f} |")
    if times.decode_ms:
        print(f"| decode only (median batch {statistics.median(times.decode_batch):.0f}) | "
              f"{len(times.decode_ms)} | {statistics.median(times.decode_ms):.2f} | "
              f"{_pct(times.decode_ms, 0.9):.2f} |")
        print(f"CPU time of a decode-only step (this thread; what other processes change "
              f"least): median {statistics.median(times.decode_cpu_ms):.2f} ms")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if pyprof is not None:
        out = io.StringIO()
        pstats.Stats(pyprof, stream=out).sort_stats("cumulative").print_stats(args.rows)
        print(out.getvalue())


if __name__ == "__main__":
    main()
