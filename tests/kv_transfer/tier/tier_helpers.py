"""Helpers of the KV tier suites (import as ``tier_helpers``): random chunks and their hashes,
and reading a tier's metrics."""

from __future__ import annotations

import random

import torch
from prometheus_client import CollectorRegistry

from engine.prefix_hash import chain_seed, chunk_hashes
from kv_transfer.tier import ChunkSpec, KVTier

PASSWORD = "s3cret-test-pass"


def random_layers(spec: ChunkSpec, seed: int) -> list[torch.Tensor]:
    """One chunk's packed layers of random, never-zero values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(spec.layout.num_layers):
        x = torch.rand(spec.layer_shape, generator=gen) + 0.25
        sign = torch.randint(0, 2, spec.layer_shape, generator=gen) * 2 - 1
        out.append((x * sign).to(spec.layout.torch_dtype))
    return out


def payload_of(layers: list[torch.Tensor]) -> bytes:
    return b"".join(bytes(t.contiguous().view(torch.uint8).reshape(-1).numpy()) for t in layers)


def prompt_hashes(spec: ChunkSpec, n_chunks: int, seed: int, salt: str | None = None
                  ) -> list[bytes]:
    tokens = random.Random(seed).choices(range(32000), k=n_chunks * spec.chunk_tokens + 7)
    return chunk_hashes(tokens, spec.layout.block_size,
                        chain_seed(spec.layout.model_id, salt))


def metric(tier: KVTier, name: str, **labels: str) -> float:
    registry: CollectorRegistry = tier.metrics.registry
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def store_all(tier: KVTier, hashes: list[bytes], seed: int = 0, timeout: float = 20
              ) -> list[list[torch.Tensor]]:
    chunks = [random_layers(tier.spec, seed + i) for i in range(len(hashes))]
    for h, layers in zip(hashes, chunks, strict=False):
        assert tier.submit_store(h, layers)
    assert tier.flush(timeout)
    return chunks
