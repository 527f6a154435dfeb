"""Fixtures shared by the engine suites: seeded random prompts, a cached HF reference, and
a check that an engine holds no blocks and no requests.

The HF reference is the slow side of every equivalence test, so its answers are cached
for the session by (model directory, prompts, number of new tokens).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

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
            for p, out in zip(missing, hf_greedy(model_dir, missing, max_new_tokens), strict=False):
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
    """Serve one request as a decode pod and a prefill pod would, with two LLMEngines and
    the real ``tcp`` connector in this process: ``decode`` reserves blocks (keeping what its
    prefix cache holds) and picks the seed; ``prefill`` computes the prompt (prefill_only)
    and its connector pushes the blocks the decode engine lacks, layer by layer; ``decode``
    then generates the rest.

    Returns every sequence's output tokens and the seed the request sampled with."""
    from engine.external_kv import KVSend
    from kv_transfer import KVTargetSpec, make_receiver, make_sender

    receiver = make_receiver("tcp", decode.kv_memory)
    sender = make_sender("tcp", prefill.kv_memory)
    try:
        decode.attach_kv_receiver(receiver)
        plan = decode.reserve_remote(rid, prompt, params, timeout_s=30)
        handle = sender.begin(KVTargetSpec("tcp", receiver.address, rid, plan.block_ids,
                                           decode.layout.fingerprint, plan.first_block))
        # The seed travels with the request, as the decode pod sends it to the prefill pod.
        prefill.add_request(rid, prompt, dataclasses.replace(params, seed=plan.seed),
                            prefill_only=True, kv_send=KVSend(handle, plan.first_block))
        firsts: dict[int, tuple[int, object]] = {}
        for _ in range(max_steps):
            if not prefill.has_work():
                break
            for out in prefill.step():
                for d in out.deltas:
                    firsts[d.index] = (d.token_ids[0], d.logprobs[0] if d.logprobs else None)
        assert not prefill.has_work() and sorted(firsts) == list(range(params.n))
        handle.wait(30)
        plan.transfer.wait(30)
        prefill.housekeeping()  # what the pod's engine loop does: free the sent blocks
        decode.complete_remote(rid, [firsts[i][0] for i in range(params.n)],
                               [firsts[i][1] for i in range(params.n)])
    finally:
        sender.close()
        receiver.close()
    tokens: list[list[int]] = [[] for _ in range(params.n)]  # first tokens stream here too
    for _ in range(max_steps):
        if not decode.has_work():
            break
        for out in decode.step():
            for d in out.deltas:
                tokens[d.index] += d.token_ids
    assert not decode.has_work()
    return tokens, plan.seed


@pytest.fixture(scope="session")
def run_disaggregated() -> Callable[..., tuple[list[list[int]], int]]:
    """run_disaggregated(prefill_engine, decode_engine, request_id, prompt, params)."""
    return _disaggregated
