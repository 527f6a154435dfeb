"""Time to first token for a prompt with a 2,048-token shared prefix: a KV tier hit (host
memory, Redis) against a miss (the whole prompt computed), on CPU.

One engine process, the real engine and the real tier (engine/tier_cache.py over
kv_transfer/tier/), a local redis-server on a free port. Each measurement uses a fresh
engine (an empty KV cache, so the pod cache cannot help) and a fresh prefix:
- miss: nothing anywhere; the prefix and the question are computed;
- pod cache hit (the floor): the same engine again, the prefix in its own KV cache;
- host hit: the prefix was computed by another engine sharing this tier's host level (a
  pod whose own blocks were evicted: its host tier still has the chunks);
- Redis hit: the prefix was computed by another engine with its own host level; this one
  has an empty host level and reads the 8 chunks from Redis.
The prompt is the prefix and a 16-token question; TTFT is from add_request to the first
token (the engine loop polls the tier between steps, as a pod's does).

    .venv/bin/python bench/kv_tier_ttft.py [--repeat 5] [--layers 8 --hidden 512]

The model is made offline (random weights, llama shape, float32); the machine is shared:
the script prints ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
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

PREFIX, QUESTION = 2048, 16


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", layers=args.layers, hidden=args.hidden,
                           heads=args.heads, kv_heads=args.kv_heads,
                           max_position_embeddings=4096)
        server = RedisServer(Path(tmp) / "redis").start()
        engine_args = EngineArgs(num_kv_blocks=(PREFIX + 64) // 16 + 8, dtype="float32",
                                 cpu_threads=args.threads, max_num_batched_tokens=4096)

        def engine_with(tier: KVTier | None) -> LLMEngine:
            e = LLMEngine(model, engine_args)
            if tier is not None:
                e.attach_kv_tier(TierPort(tier, e.kv_memory))
            return e

        probe = LLMEngine(model, engine_args)
        spec = ChunkSpec(probe.layout)
        print(f"model: {args.layers} layers, hidden {args.hidden}, {args.kv_heads} KV heads; "
              f"chunk value {spec.value_bytes / 2**20:.1f} MiB, {PREFIX // 256} chunks per "
              f"prefix")
        redis_cfg = RedisTierConfig(server.url)
        shared_host = KVTier(spec, TierConfig(host_bytes=1 << 30), TierMetrics())
        writer = KVTier(spec, TierConfig(host_bytes=0, redis=redis_cfg), TierMetrics())
        rng = random.Random(0)
        results: dict[str, list[float]] = {"miss": [], "pod cache hit": [], "host hit": [],
                                           "redis hit": []}
        ttft(probe, "warm-up", rng.choices(range(2048), k=PREFIX + QUESTION))  # first-call costs
        for i in range(args.repeat):
            prefix = rng.choices(range(2048), k=PREFIX)

            def prompt() -> list[int]:
                return prefix + rng.choices(range(2048), k=QUESTION)  # noqa: B023

            plain = engine_with(None)
            results["miss"].append(ttft(plain, f"m{i}", prompt()))
            # the floor: the prefix in this engine's own KV cache, only the question computed
            results["pod cache hit"].append(ttft(plain, f"p{i}", prompt()))
            ttft(engine_with(shared_host), f"hw{i}", prompt())
            assert shared_host.flush(30)
            results["host hit"].append(ttft(engine_with(shared_host), f"h{i}", prompt()))
            ttft(engine_with(writer), f"rw{i}", prompt())
            assert writer.flush(30)
            reader = KVTier(spec, TierConfig(host_bytes=0, redis=redis_cfg), TierMetrics())
            results["redis hit"].append(ttft(engine_with(reader), f"r{i}", prompt()))
            hits = reader.metrics.registry.get_sample_value("pdserve:kv_tier_hits_total",
                                                            {"level": "redis"})
            assert hits == PREFIX // 256, f"the Redis reader hit {hits} chunks"
            reader.close()
        miss = statistics.median(results["miss"])
        for name, values in results.items():
            med = statistics.median(values)
            print(f"{name:10s} TTFT median {med * 1e3:8.1f} ms  (min {min(values) * 1e3:.1f}, "
                  f"max {max(values) * 1e3:.1f}; n={len(values)})  speed-up vs miss "
                  f"{miss / med:5.1f}x")
        shared_host.close()
        writer.close()
        server.stop()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
