"""Helpers of the shared-KV-tier end-to-end suite (import as ``tier_e2e_helpers``): prompts,
greedy completions through the router, the chunk keys a prompt has in Redis, and the pods'
tier metrics."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import redis
from e2e_helpers import Stack, completion_choices

from engine.config import ModelConfig
from engine.kv_layout import KVLayout
from engine.prefix_hash import chain_seed, chunk_hashes
from kv_transfer.tier import ChunkSpec, redis_key

NEW_TOKENS = 6


def prompt_of(seed: int, length: int, vocab: int = 2048) -> list[int]:
    return random.Random(seed).choices(range(vocab), k=length)


def complete(stack: Stack, prompt: list[int], salt: str | None = None) -> tuple[list[int], int]:
    """Greedy completion of token ids: (its token ids, usage's cached_tokens)."""
    body: dict[str, Any] = {"ignore_eos": True, "return_token_ids": True}
    if salt is not None:
        body["cache_salt"] = salt
    reply = stack.client().completions.create(model=stack.model, prompt=prompt,
                                              max_tokens=NEW_TOKENS, temperature=0,
                                              extra_body=body)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
    details = reply.usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else 0
    return completion_choices(reply)[0].token_ids, cached or 0


def pod_spec(model_dir: Path, dtype: str = "float32", block_size: int = 16) -> ChunkSpec:
    """The chunk spec of a pod serving ``model_dir`` with these options."""
    cfg = ModelConfig.from_dir(model_dir)
    layout = KVLayout(cfg.model_id, dtype, block_size, cfg.num_layers, cfg.num_kv_heads,
                      cfg.head_dim)
    return ChunkSpec(layout)


def prompt_keys(spec: ChunkSpec, prompt: list[int], salt: str | None = None) -> list[str]:
    """Redis keys of the prompt's full chunks (those a pod stores: not the last token's)."""
    hashes = chunk_hashes(prompt[:len(prompt) - 1], spec.layout.block_size,
                          chain_seed(spec.layout.model_id, salt))
    return [redis_key(spec.fingerprint, h) for h in hashes]


def wait_keys(client: redis.Redis, keys: list[str], timeout: float = 30) -> None:
    """Until every key exists (stores are written after the answer, asynchronously)."""
    deadline = time.monotonic() + timeout
    while sum(client.exists(k) for k in keys) < len(keys):
        assert time.monotonic() < deadline, "the prompt's chunks never reached Redis"
        time.sleep(0.05)


def prefill_metric(stack: Stack, name: str, labels: str = "") -> dict[str, float]:
    """One metric of every prefill pod, by address."""
    return {p["address"]: stack.pod_metric(p, name, labels)
            for p in stack.pools()["pods"] if p["pool"] == "prefill"}


def served_prefill(before: dict[str, float], after: dict[str, float]) -> str:
    (addr,) = [a for a in after if after[a] > before.get(a, 0)]
    return addr
