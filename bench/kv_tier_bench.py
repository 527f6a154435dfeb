"""Micro-benchmark of the shared KV tier: GB/s of storing and loading 256-token chunks.

For each layout (a tiny model, a Llama-3.2-1B shape, a Llama-3-8B shape: 32 layers, 8 KV
heads, head_dim 128, bf16 = 32 MiB per chunk) it measures, in one run:
- codec: ``encode_value`` (copy the packed layers into one buffer + XXH3-128) and
  ``decode_value`` (header checks + XXH3-128), in memory;
- host tier: ``submit_store`` + ``flush``; ``load`` (zero-copy views) and ``load`` followed
  by ``scatter_chunk`` into a KV cache (what a pod does with a hit);
- Redis tier (host level off): the same store and load through a local redis-server;
- baseline: raw redis-py (asyncio, hiredis) pipelined SETs and batched MGETs of the same
  value bytes, same batch size, same server, same process.
GB/s counts value bytes (header + payload) per second, best of ``--repeat`` runs.

    .venv/bin/python bench/kv_tier_bench.py [--layouts tiny,1b,8b] [--repeat 3]
        [--redis-url redis://...]   # default: start a redis-server on a free port

The machine is shared: the script prints ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engine.kv_layout import KVLayout  # noqa: E402 -- after the path set-up above
from engine.prefix_hash import chain_seed, chunk_hashes  # noqa: E402
from kv_transfer.tier import (  # noqa: E402
    ChunkSpec,
    KVTier,
    RedisTierConfig,
    TierConfig,
    TierMetrics,
    decode_value,
    encode_value,
    redis_key,
    scatter_chunk,
)

LAYOUTS = {
    # (layers, kv heads, head_dim, dtype, chunks per run)
    "tiny": (2, 2, 16, "float32", 64),  # models/default: 128 KiB per chunk
    "1b": (16, 8, 64, "bfloat16", 16),  # Llama-3.2-1B shape: 8 MiB per chunk
    "8b": (32, 8, 128, "bfloat16", 8),  # Llama-3-8B shape: 32 MiB per chunk
}
INFLIGHT = 256 << 20


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_chunks(spec: ChunkSpec, n: int, seed: int) -> tuple[list[bytes], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (n * spec.chunk_tokens,), generator=gen).tolist()
    hashes = chunk_hashes(tokens, spec.layout.block_size,
                          chain_seed(spec.layout.model_id, f"bench-{seed}"))
    layers = [[torch.randn(spec.layer_shape, generator=gen).to(spec.layout.torch_dtype)
               for _ in range(spec.layout.num_layers)] for _ in range(n)]
    return hashes, layers


def bench_layout(name: str, url: str, repeat: int) -> list[tuple[str, str, str, float, str]]:
    layers_n, heads, dim, dtype, n = LAYOUTS[name]
    layout = KVLayout(model_id=f"bench-{name}", dtype=dtype, block_size=16, num_layers=layers_n,
                      num_kv_heads=heads, head_dim=dim)
    spec = ChunkSpec(layout)
    hashes, chunks = make_chunks(spec, n, seed=1)
    total = n * spec.value_bytes
    rows: list[tuple[str, str, float, str]] = []

    def row(what: str, op: str, seconds: float, note: str = "") -> None:
        rows.append((what, op, total / seconds / 1e9, note))

    values = [bytes(encode_value(spec, h, c)) for h, c in zip(hashes, chunks, strict=False)]
    row("codec", "encode", best_seconds(
        lambda: [encode_value(spec, h, c) for h, c in zip(hashes, chunks, strict=False)], repeat))
    row("codec", "decode", best_seconds(
        lambda: [decode_value(spec, h, v) for h, v in zip(hashes, values, strict=False)], repeat))

    cache_blocks = n * spec.blocks
    cache = [torch.zeros(layout.layer_shape(cache_blocks), dtype=layout.torch_dtype)
             for _ in range(layout.num_layers)]

    def store(tier: KVTier) -> None:
        for h, c in zip(hashes, chunks, strict=False):
            while not tier.submit_store(h, c):  # at the bytes-in-flight bound: wait a little
                time.sleep(0.001)
        assert tier.flush(120)

    def load(tier: KVTier, scatter: bool) -> None:
        got = tier.load(hashes).result(120)
        assert len(got) == n, f"loaded {len(got)} of {n} chunks"
        if scatter:
            for i, payload in enumerate(got):
                ids = list(range(i * spec.blocks, (i + 1) * spec.blocks))
                scatter_chunk(spec, cache, ids, payload)

    host = KVTier(spec, TierConfig(host_bytes=total + (64 << 20), max_inflight_bytes=INFLIGHT),
                  TierMetrics())
    try:
        row("host tier", "store", best_seconds(lambda: store(host), repeat))
        row("host tier", "load (views)", best_seconds(lambda: load(host, False), repeat))
        row("host tier", "load + scatter", best_seconds(lambda: load(host, True), repeat))
    finally:
        host.close()

    redis_tier = KVTier(spec, TierConfig(host_bytes=0, max_inflight_bytes=INFLIGHT,
                                         redis=RedisTierConfig(url=url, op_timeout_s=60)),
                        TierMetrics())
    batch = max(1, INFLIGHT // spec.value_bytes)
    raw = RawRedis(url, spec, hashes, values, batch)
    # The tier and the raw baseline alternate within each repeat, so that the load other
    # work puts on this shared machine falls on both alike.
    best = {k: float("inf") for k in ("store", "load", "scatter", "set", "mget")}
    try:
        for _ in range(repeat):
            for key, fn in (("store", lambda: store(redis_tier)), ("set", raw.set_all),
                            ("load", lambda: load(redis_tier, False)), ("mget", raw.get_all),
                            ("scatter", lambda: load(redis_tier, True))):
                best[key] = min(best[key], best_seconds(fn, 1))
    finally:
        redis_tier.close()
        raw.close()
    row("redis tier", "store", best["store"])
    row("redis tier", "load", best["load"])
    row("redis tier", "load + scatter", best["scatter"])
    row("raw redis-py", "pipelined SET", best["set"], "baseline")
    row("raw redis-py", f"MGET x{batch}", best["mget"], "baseline")
    return [(f"{name} ({spec.value_bytes / 2**20:.3g} MiB x {n})", *r[:2], r[2], r[3])
            for r in rows]


class RawRedis:
    """The baseline: redis-py asyncio (hiredis) on its own loop, no codec, no tier."""

    def __init__(self, url: str, spec: ChunkSpec, hashes: list[bytes], values: list[bytes],
                 batch: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.from_url(url, socket_timeout=60)
        self.keys = [redis_key(spec.fingerprint, h) + ":raw" for h in hashes]
        self.values = values
        self.batch = batch

    def set_all(self) -> None:
        async def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for k, v in zip(self.keys, self.values, strict=False):
                pipe.set(k, v, ex=600)
            await pipe.execute()

        self.loop.run_until_complete(run())

    def get_all(self) -> None:
        async def run() -> None:
            for i in range(0, len(self.keys), self.batch):
                got = await self.client.mget(self.keys[i:i + self.batch])
                assert all(g is not None for g in got)

        self.loop.run_until_complete(run())

    def close(self) -> None:
        async def run() -> None:
            await self.client.delete(*self.keys)
            await self.client.aclose()

        self.loop.run_until_complete(run())
        self.loop.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default="tiny,1b,8b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()
    print("uptime:", subprocess.run(["uptime"], check=False, capture_output=True,
                                    text=True).stdout.strip())
    server = None
    url = args.redis_url
    if url is None:
        from redis_server import RedisServer  # type: ignore[import-not-found]

        server = RedisServer(Path(tempfile.mkdtemp(prefix="kv-tier-bench-"))).start()
        url = server.url
        print(f"redis-server {server.binary} on {url}")
    try:
        rows = []
        for name in args.layouts.split(","):
            rows += bench_layout(name, url, args.repeat)
    finally:
        if server is not None:
            server.stop()
    print("\n| layout | path | op | GB/s | note |\n| --- | --- | --- | --- | --- |")
    for layout, what, op, gbs, note in rows:
        print(f"| {layout} | {what} | {op} | {gbs:.2f} | {note} |")
    print("uptime:", subprocess.run(["uptime"], check=False, capture_output=True,
                                    text=True).stdout.strip())


if __name__ == "__main__":
    main()
