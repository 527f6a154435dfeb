"""Prompt logprobs: every prompt token's log-probability given the tokens before it equals
transformers' log_softmax, with its rank and the top k, however the prompt was computed
(one step or chunked) and even when the prefix cache holds the prompt."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_logits

from engine import LLM, SamplingParams


def _run(llm: LLM, rid: str, prompt: list[int], params: SamplingParams):
    engine = llm.engine
    engine.add_request(rid, prompt, params)
    got = None
    while engine.has_work():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert got is None, "prompt logprobs were sent twice"
                got = out.prompt_logprobs
    return got


@pytest.fixture(scope="module")
def prompt(make_prompts) -> list[int]:
    return make_prompts([37], 2048, 5)[0]


@pytest.fixture(scope="module")
def reference(tiny_model, prompt) -> torch.Tensor:
    return torch.log_softmax(hf_logits(tiny_model, prompt), dim=-1)


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 8}],
                         ids=["one-step", "chunked"])
def test_prompt_logprobs_equal_transformers(tiny_model, prompt, reference, engine_args) -> None:
    llm = LLM(tiny_model, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, n=1)
    for attempt in ("cold", "prefix cached"):
        lps = _run(llm, attempt, prompt, params)
        assert lps is not None and len(lps) == len(prompt) - 1, attempt
        for pos, lp in enumerate(lps, start=1):
            row = reference[pos - 1]
            assert lp.token_id == prompt[pos]
            assert lp.logprob == pytest.approx(row[prompt[pos]].item(), abs=1e-4)
            assert lp.rank == int((row > row[prompt[pos]]).sum()) + 1
            values, ids = torch.topk(row, 3)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_no_prompt_logprobs_unless_asked_and_once_with_n(tiny_model, prompt) -> None:
    llm = LLM(tiny_model)
    assert _run(llm, "plain", prompt, SamplingParams(temperature=0.0, max_tokens=2)) is None
    forked = _run(llm, "n3", prompt, SamplingParams(temperature=1.0, seed=1, n=3,
                                                    max_tokens=3, prompt_logprobs=0))
    assert forked is not None and len(forked) == len(prompt) - 1
    assert all(lp.top == [] for lp in forked)


def test_the_offline_llm_returns_them_as_vllm_does(tiny_model, prompt) -> None:
    result = LLM(tiny_model).generate([prompt], SamplingParams(max_tokens=2,
                                                               prompt_logprobs=1))[0]
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    assert [lp.token_id for lp in result.prompt_logprobs[1:]] == prompt[1:]
