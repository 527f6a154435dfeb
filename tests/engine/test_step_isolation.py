"""One request's failure inside a step is that request's alone (issue 11).

Sampling is robust to every value SamplingParams accepts (test_sampler_extremes.py), so
the faults here are injected where the real ones would surface: the model's logits for one
request turn NaN, or the forward raises whenever one request is in the batch. The other
requests of the batch must finish with transformers' greedy tokens, the bad one must be
reported through ``take_failures`` with a pdserve error, and no block may be left held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import PdserveError
from engine.llm_engine import EngineArgs, LLMEngine
from engine.sampling_params import SamplingParams

NEW_TOKENS = 6
BAD = "bad"


@pytest.fixture
def engine(tiny_model: Path) -> Iterator[LLMEngine]:
    yield LLMEngine(tiny_model, EngineArgs(num_kv_blocks=64, dtype="float32"))


def _run(engine: LLMEngine, prompts: dict[str, list[int]]
         ) -> tuple[dict[str, list[int]], dict[str, PdserveError]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    failed: dict[str, PdserveError] = {}
    for _ in range(200):
        if not engine.has_work():
            break
        for out in engine.step():
            for d in out.deltas:
                tokens[out.request_id] += d.token_ids
        failed.update(engine.take_failures())
    return tokens, failed


def _inject(engine: LLMEngine, fault: Callable[[Any, torch.Tensor, list[int]], Any]) -> None:
    """Wrap the runner's execute: ``fault(batch, logits, row_seq)`` runs on each result."""
    real = engine.runner.execute

    def execute(batch: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, list[int]]:
        logits, row_seq = real(batch, *args, **kwargs)
        fault(batch, logits, row_seq)
        return logits, row_seq

    engine.runner.execute = execute  # type: ignore[method-assign]


def _nan_row(batch: Any, logits: torch.Tensor, row_seq: list[int]) -> None:
    for row, j in enumerate(row_seq):
        if batch.seqs[j].request_id == BAD and batch.seqs[j].num_output_tokens >= 2:
            logits[row, 5] = float("nan")


def _raise_with_bad(batch: Any, logits: torch.Tensor, row_seq: list[int]) -> None:
    if any(s.request_id == BAD and s.num_output_tokens >= 2 for s in batch.seqs):
        raise RuntimeError("injected: the forward fails whenever 'bad' is in the batch")


@pytest.mark.parametrize("fault", [_nan_row, _raise_with_bad], ids=["nan-logits", "forward"])
def test_a_failing_request_fails_alone_and_the_batch_goes_on(
        engine: LLMEngine, tiny_model: Path, make_prompts, hf_greedy_cached, assert_idle,
        fault: Callable) -> None:
    good = make_prompts([5, 11, 17], engine.config.vocab_size, 21)
    prompts = {f"good-{i}": p for i, p in enumerate(good)}
    prompts[BAD] = make_prompts([9], engine.config.vocab_size, 22)[0]
    _inject(engine, fault)
    tokens, failed = _run(engine, prompts)
    assert list(failed) == [BAD]
    assert failed[BAD].grpc_code == "INTERNAL" and "Traceback" not in failed[BAD].message
    assert len(tokens[BAD]) == 2  # what it had before its row went bad
    want = hf_greedy_cached(tiny_model, good, NEW_TOKENS)
    assert [tokens[f"good-{i}"] for i in range(len(good))] == want
    assert_idle(engine)
