"""Time to first token for a prompt with a long shared prefix: a KV tier hit (host memory,
Redis) against a miss (the whole prompt computed), on CPU or a GPU (issue 10).

One process, the real engine and the real tier (engine/tier_cache.py over
kv_transfer/tier/), a local redis-server on a free port. Per prefix length, two engines:
one with a host-memory tier only, one with a Redis tier only (no host level). Each
measurement uses a fresh random prefix:
- miss: nothing anywhere; the prefix and the question are computed;
- pod cache hit (the floor): the same prefix again, in the engine's own KV cache;
- host hit: the prefix, computed and stored by the host-tier engine, then pushed out of its
  KV cache by two other prompts of the same size; the tier must give every chunk back;
- Redis hit: the same on the Redis-only engine: every chunk comes from Redis.
The prompt is the prefix and a 16-token question; TTFT is from add_request to the first
token on the host (the engine loop polls the tier between steps, as a pod's does). From
the medians it prints the tier's effective load bandwidth (the prefix's chunk bytes over
what a hit adds to the floor) and the break-even bandwidth (those bytes over what a miss
adds to the floor): a tier that loads faster than that beats recomputing.

    .venv/bin/python bench/kv_tier_ttft.py [--repeat 5] [--layers 8 --hidden 512]
    # GPU, an existing model (e.g. the 8B shape bench/gpu_steps.sh makes):
    python3 bench/kv_tier_ttft.py --model /tmp/m8b --device cuda --dtype bfloat16 \
        --prefixes 4096,16384 --repeat 3

Without ``--model`` the model is made offline (random weights, llama shape, float32). The
machine may be shared: the script prints ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "tests")]

from redis_server import RedisServer  # noqa: E402

from engine.llm_engine import EngineArgs, LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kv_transfer.tier import (  # noqa: E402
    ChunkSpec,
    KVTier,
    RedisTierConfig,
    TierConfig,
    TierMetrics,
)
from kv_transfer.tier.engine_port import TierPort  # noqa: E402
from pdserve.make_model import make_model  # noqa: E402

QUESTION = 16


def ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
    while True:
        engine.housekeeping()
        for out in engine.step():
            if out.request_id == rid and out.deltas and out.deltas[0].token_ids:
                elapsed = time.perf_counter() - t0
                while engine.has_work():
                    engine.step()
                engine.flush_tier_stores()
                return elapsed
        time.sleep(0.0002)


def tier_hits(tier: KVTier, level: str) -> float:
    value = tier.metrics.registry.get_sample_value("pdserve:kv_tier_hits_total", {"level": level})
    return value or 0.0


def measure_prefix(model: Path, args: argparse.Namespace, prefix_len: int, redis_url: str,
                   rng: random.Random) -> dict[str, list[float]]:
    engine_args = EngineArgs(device=args.device, dtype=args.dtype, cpu_threads=args.threads,
                             num_kv_blocks=(prefix_len + 64) // 16 + 8,
                             max_num_batched_tokens=args.max_num_batched_tokens,
                             max_model_len=prefix_len + 64)
    vocab = args.vocab

    def tokens(n: int) -> list[int]:
        return rng.choices(range(vocab), k=n)

    def engine_with(tier: KVTier) -> LLMEngine:
        e = LLMEngine(model, engine_args)
        e.attach_kv_tier(TierPort(tier, e.kv_memory))
        return e

    host_tier: KVTier | None = None
    redis_tier: KVTier | None = None
    host_engine = redis_engine = None
    try:
        host_engine = LLMEngine(model, engine_args)
        spec = ChunkSpec(host_engine.layout)
        # room for the prefix's chunks in flight: a store beyond the bound is dropped
        prefix_bytes = prefix_len // 256 * spec.value_bytes
        host_tier = KVTier(spec, TierConfig(host_bytes=4 * prefix_bytes,
                                            max_inflight_bytes=2 * prefix_bytes),
                           TierMetrics())
        host_engine.attach_kv_tier(TierPort(host_tier, host_engine.kv_memory))
        redis_tier = KVTier(spec, TierConfig(host_bytes=0, redis=RedisTierConfig(redis_url),
                                             max_inflight_bytes=2 * prefix_bytes),
                            TierMetrics())
        redis_engine = engine_with(redis_tier)
        chunks = prefix_len // 256
        print(f"prefix {prefix_len} tokens: {chunks} chunks of {spec.value_bytes / 2**20:.1f} "
              f"MiB = {chunks * spec.value_bytes / 2**30:.2f} GiB", flush=True)
        results: dict[str, list[float]] = {"miss": [], "pod cache hit": [], "host hit": [],
                                           "redis hit": []}

        def tier_hit(engine: LLMEngine, tier: KVTier, level: str, prefix: list[int],
                     tag: str) -> float:
            """TTFT of ``prefix`` once the tier has it and the engine's own cache does not."""
            assert tier.flush(60)
            for j in range(2):  # two prompts of the prefix's size take every block it held
                ttft(engine, f"{tag}-fill{j}", tokens(prefix_len + QUESTION))
            before = tier_hits(tier, level)
            seconds = ttft(engine, tag, prefix + tokens(QUESTION))
            got = tier_hits(tier, level) - before
            assert got == chunks, f"the {level} level gave {got} of {chunks} chunks"
            return seconds

        for engine, tag in ((host_engine, "wh"), (redis_engine, "wr")):  # first-call costs
            ttft(engine, tag, tokens(prefix_len + QUESTION))
        for i in range(args.repeat):
            prefix = tokens(prefix_len)
            results["miss"].append(ttft(host_engine, f"m{i}", prefix + tokens(QUESTION)))
            results["pod cache hit"].append(ttft(host_engine, f"p{i}", prefix + tokens(QUESTION)))
            results["host hit"].append(tier_hit(host_engine, host_tier, "host", prefix, f"h{i}"))
            prefix = tokens(prefix_len)
            ttft(redis_engine, f"rw{i}", prefix + tokens(QUESTION))  # stored in Redis
            results["redis hit"].append(tier_hit(redis_engine, redis_tier, "redis", prefix,
                                                 f"r{i}"))
        report(results, chunks * spec.value_bytes)
        return results
    finally:
        for tier in (host_tier, redis_tier):
            if tier is not None:
                tier.close()
        del host_engine, redis_engine
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def report(results: dict[str, list[float]], prefix_bytes: int) -> None:
    med = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"  {name:14s} TTFT median {med[name] * 1e3:9.1f} ms  (min {min(values) * 1e3:.1f}, "
              f"max {max(values) * 1e3:.1f}; n={len(values)})  speed-up vs miss "
              f"{med['miss'] / med[name]:5.1f}x", flush=True)
    floor = med["pod cache hit"]
    for name in ("host hit", "redis hit"):
        extra = med[name] - floor
        if extra > 0:
            print(f"  {name}: effective load {prefix_bytes / extra / 1e9:6.2f} GB/s "
                  f"({extra * 1e3:.1f} ms over the floor)")
    if med["miss"] > floor:
        print(f"  break-even: a tier loading faster than "
              f"{prefix_bytes / (med['miss'] - floor) / 1e9:.2f} GB/s beats recomputing "
              f"(a miss costs {(med['miss'] - floor) * 1e3:.1f} ms over the floor)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", type=Path, default=None,
                    help="an existing model directory (default: make a small random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefixes", default="2048", help="prefix lengths, multiples of 256")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prefixes = [int(x) for x in args.prefixes.split(",") if x]
    if any(n % 256 or n <= 0 for n in prefixes):
        ap.error("--prefixes: positive multiples of 256 (the tier's chunk)")
    if args.device != "cpu":
        args.threads = None
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = make_model(Path(tmp) / "model", layers=args.layers, hidden=args.hidden,
                               heads=args.heads, kv_heads=args.kv_heads,
                               max_position_embeddings=max(4096, max(prefixes) + 64))
        args.vocab = min(json.loads((Path(model) / "config.json").read_text())["vocab_size"],
                         32000)
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            rng = random.Random(0)
            for prefix_len in prefixes:
                measure_prefix(Path(model), args, prefix_len, server.url, rng)
        finally:
            server.stop()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
