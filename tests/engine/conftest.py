"""Fixtures shared by the engine suites: seeded random prompts, a cached HF reference, and
a check that an engine holds no blocks and no requests.

The HF reference is the slow side of every equivalence test, so its answers are cached
for the session by (model directory, prompts, number of new tokens).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import pytest

from hf_reference import hf_greedy

GreedyRef = Callable[[Path, list[list[int]], int], list[list[int]]]


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """One prompt of random token ids per length, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="session")
def make_prompts() -> Callable[[list[int], int, int], list[list[int]]]:
    return random_prompts


@pytest.fixture(scope="session")
def hf_greedy_cached() -> GreedyRef:
    cache: dict[tuple, list[list[int]]] = {}

    def ref(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        missing = [p for p in prompts if (str(model_dir), tuple(p), max_new_tokens) not in cache]
        if missing:
            for p, out in zip(missing, hf_greedy(model_dir, missing, max_new_tokens)):
                cache[(str(model_dir), tuple(p), max_new_tokens)] = out
        return [cache[(str(model_dir), tuple(p), max_new_tokens)] for p in prompts]

    return ref


def _assert_idle(engine) -> None:
    pool = engine.pool
    assert not engine.requests, f"requests left behind: {sorted(engine.requests)}"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert pool.num_free == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free} of {pool.num_blocks} blocks still held")
    held = [b for b, c in enumerate(pool.ref_counts) if c != 0]
    assert not held, f"blocks with non-zero ref counts: {held[:10]}"


@pytest.fixture(scope="session")
def assert_idle() -> Callable[[object], None]:
    """assert_idle(engine): no requests, no queued sequences, every block free, refs 0."""
    return _assert_idle


def _disaggregated(prefill, decode, rid: str, prompt: list[int], params,
                   max_steps: int = 1000) -> tuple[list[list[int]], int]:
    """Serve one request as a prefill pod and a decode pod would, with two LLMEngines:
    ``prefill`` computes the prompt (prefill_only, its KV caught layer by layer by a sink)
    and samples the first token(s); ``decode`` reserves blocks, receives that KV by a copy
    into its own cache, and generates the rest.

    Returns every sequence's output tokens and the seed the request sampled with."""
    layers: dict[int, object] = {}

    def sink(layer, cache, block_ids):
        layers[layer] = cache[:, block_ids].clone()

    prefill.add_request(rid, prompt, params, prefill_only=True, kv_sink=sink)
    seed = prefill.seed_of(rid)  # an unseeded request's drawn seed travels with it
    firsts: dict[int, tuple[int, object]] = {}
    for _ in range(max_steps):
        if not prefill.has_work():
            break
        for out in prefill.step():
            for d in out.deltas:
                firsts[d.index] = (d.token_ids[0], d.logprobs[0] if d.logprobs else None)
    assert not prefill.has_work() and sorted(firsts) == list(range(params.n))

    block_ids = decode.reserve_remote(rid, prompt, params, seed=seed)
    for layer in range(len(layers)):
        decode.runner.kv_caches[layer][:, block_ids] = layers[layer]
    decode.complete_remote(rid, [firsts[i][0] for i in range(params.n)],
                           [firsts[i][1] for i in range(params.n)])
    tokens: list[list[int]] = [[] for _ in range(params.n)]  # first tokens stream here too
    for _ in range(max_steps):
        if not decode.has_work():
            break
        for out in decode.step():
            for d in out.deltas:
                tokens[d.index] += d.token_ids
    assert not decode.has_work()
    return tokens, seed


@pytest.fixture(scope="session")
def run_disaggregated() -> Callable[..., tuple[list[list[int]], int]]:
    """run_disaggregated(prefill_engine, decode_engine, request_id, prompt, params)."""
    return _disaggregated
