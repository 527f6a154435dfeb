"""Prefill speed of the engine on a GPU, and where its time goes.

For prompts of 1k, 4k and 8k tokens (fresh random ids: no prefix hits), the time from
add_request to the first token inside one LLMEngine (no servers), with the step budget at
8,192 tokens (one step) and at 2,048 (chunked, pdserve up's default); the model FLOP rate
that implies (2 x parameters x tokens, attention not counted); and a torch.profiler view
of one 8k prefill: GPU busy time against wall time, and the kernels that take the most.

    python3 bench/gpu_prefill.py --model /tmp/m8b [--lengths 1024,4096,8192]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def first_token_s(engine: LLMEngine, prompt: list[int], tag: str) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(tag, prompt, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_work():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    engine = LLMEngine(args.model, EngineArgs(device="cuda", dtype="bfloat16",
                                              num_kv_blocks=4096, max_num_batched_tokens=8192))
    params = sum(p.numel() for p in engine.runner.model.parameters())
    vocab = engine.config.vocab_size
    rng = random.Random(0)
    n = 0

    def prompt(length: int) -> list[int]:
        return [rng.randrange(1000, vocab - 1000) for _ in range(length)]

    first_token_s(engine, prompt(512), "warm")
    print(f"{args.model} on {torch.cuda.get_device_name()}: {params / 1e9:.2f} B parameters")
    print("| step budget | prompt tokens | first token ms (median) | model TFLOP/s |")
    print("| --- | --- | --- | --- |")
    for budget in (8192, 2048):
        engine.scheduler.max_num_batched_tokens = budget
        for length in (int(x) for x in args.lengths.split(",")):
            times = []
            for _ in range(args.repeat):
                n += 1
                times.append(first_token_s(engine, prompt(length), f"p{n}"))
            s = statistics.median(times)
            print(f"| {budget} | {length} | {1e3 * s:.1f} | {2 * params * length / s / 1e12:.0f} |",
                  flush=True)
    engine.scheduler.max_num_batched_tokens = 8192
    from torch.profiler import ProfilerActivity, profile

    p = prompt(8192)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = first_token_s(engine, p, "profiled")
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"\nprofiled 8k prefill: wall {1e3 * wall:.1f} ms, GPU kernels {gpu_us / 1e3:.1f} ms")
    print(events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
