"""``pdserve up --mode colocated --api-key K``: decode pods prefill themselves.

No prefill pod is started, and greedy completions and chats, streamed and not, still give
exactly transformers' greedy tokens. The API key guards /v1 only: a wrong or missing key is
a 401 in OpenAI's shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e_helpers import (
    POD_ARGS,
    Stack,
    chat_choices,
    collect_stream,
    completion_choices,
    start_stack,
)
from hf_reference import hf_greedy

from engine.tokenizer import apply_chat_template

pytestmark = pytest.mark.timeout(180)

API_KEY = "sk-e2e-colocated"
MAX_TOKENS = 32
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0,
          "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def colocated(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-colocated"),
                     "--mode", "colocated", "--decode", "1", "--pod-args", POD_ARGS,
                     api_key=API_KEY) as s:
        yield s


def test_colocated_runs_no_prefill_pod(colocated: Stack) -> None:
    pods = colocated.pools()["pods"]
    assert [p["pool"] for p in pods] == ["decode"] and pods[0]["healthy"], pods


def test_colocated_completion_gives_hf_greedy_tokens(colocated: Stack, tokenizer: Any) -> None:
    prompt = "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n"
    prompt_ids = list(tokenizer.encode(prompt))
    want = hf_greedy(colocated.model_dir, [prompt_ids], MAX_TOKENS)[0]
    client = colocated.client()
    whole = client.completions.create(model=colocated.model, prompt=prompt, **GREEDY)
    [got] = completion_choices(whole)
    assert got.token_ids == want and got.finish_reason == "length"
    assert whole.usage.prompt_tokens == len(prompt_ids)
    [streamed], _ = collect_stream(client.completions.create(
        model=colocated.model, prompt=prompt, stream=True, **GREEDY), chat=False)
    assert streamed == got


def test_colocated_chat_gives_hf_greedy_tokens(colocated: Stack, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Write a class with one method."}]
    want = hf_greedy(colocated.model_dir, [apply_chat_template(tokenizer, messages)],
                     MAX_TOKENS)[0]
    client = colocated.client()
    [got] = chat_choices(client.chat.completions.create(model=colocated.model,
                                                        messages=messages, **GREEDY))
    assert got.token_ids == want and got.finish_reason == "length"
    [streamed], _ = collect_stream(client.chat.completions.create(
        model=colocated.model, messages=messages, stream=True, **GREEDY), chat=True)
    assert streamed == got


def test_a_wrong_or_missing_api_key_is_a_401(colocated: Stack) -> None:
    wrong = openai.OpenAI(base_url=colocated.url + "/v1", api_key="sk-wrong", max_retries=0,
                          timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=colocated.model, prompt="a", max_tokens=2)
    for headers in ({}, {"authorization": f"Bearer {API_KEY}x"}, {"authorization": API_KEY}):
        reply = httpx.post(colocated.url + "/v1/chat/completions", headers=headers, timeout=30,
                           json={"messages": [{"role": "user", "content": "a"}]})
        assert reply.status_code == 401, reply.text
        assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}
    # health and metrics stay open (probes and scrapers carry no key); the pool view, which
    # shows every pod's address, needs the key
    for path in ("/health", "/metrics"):
        assert httpx.get(colocated.url + path, timeout=10).status_code == 200, path
    assert httpx.get(colocated.url + "/pools", timeout=10).status_code == 401
    keyed = {"authorization": f"Bearer {API_KEY}"}
    assert httpx.get(colocated.url + "/pools", headers=keyed, timeout=10).status_code == 200
