"""What clients of vLLM's server script against, checked over 1 prefill + 1 decode pod:
the utility endpoints, model cards, echo with logprobs and prompt logprobs, stream details
and UTF-8 at the end of a sequence.

The expected shapes are those vLLM 0.32 answered to the same requests (recorded in
../shared/reference/vllm-responses.txt; the keys are copied here so the suite stands alone).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch
from e2e_helpers import Stack
from hf_reference import hf_logits

pytestmark = pytest.mark.timeout(180)

# vLLM 0.32: GET /v1/models
CARD_KEYS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len",
             "permission"}
PERMISSION_KEYS = {"id", "object", "created", "allow_create_engine", "allow_sampling",
                   "allow_logprobs", "allow_search_indices", "allow_view", "allow_fine_tuning",
                   "organization", "group", "is_blocking"}


def _sse(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: "):]))
    assert response.text.rstrip().endswith("data: [DONE]")
    return events


def test_model_cards_have_vllms_fields(stack: Stack) -> None:
    listing = httpx.get(stack.url + "/v1/models", timeout=10).json()
    [card] = listing["data"]
    assert set(card) == CARD_KEYS and card["object"] == "model"
    assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    assert card["parent"] is None and card["root"] and card["max_model_len"] > 0
    [perm] = card["permission"]
    assert set(perm) == PERMISSION_KEYS and perm["id"].startswith("modelperm-")
    assert perm["object"] == "model_permission" and perm["allow_sampling"] is True
    one = httpx.get(f"{stack.url}/v1/models/{stack.model}", timeout=10).json()
    assert one["id"] == card["id"] and one["created"] == card["created"]


def test_tokenize_and_detokenize(stack: Stack, tokenizer: Any) -> None:
    text = "def hello_world(): 你好"
    got = httpx.post(stack.url + "/tokenize", json={"model": stack.model, "prompt": text},
                     timeout=10).json()
    assert set(got) == {"count", "max_model_len", "tokens", "token_strs"}
    assert got["tokens"] == tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["token_strs"] is None
    strs = httpx.post(stack.url + "/tokenize",
                      json={"prompt": text, "return_token_strs": True}, timeout=10).json()
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    back = httpx.post(stack.url + "/detokenize", json={"model": stack.model,
                                                       "tokens": got["tokens"]}, timeout=10)
    assert back.json() == {"prompt": text}
    bad = httpx.post(stack.url + "/detokenize", json={"tokens": [10 ** 7]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    unknown = httpx.post(stack.url + "/tokenize", json={"model": "nope", "prompt": "x"},
                         timeout=10)
    assert unknown.status_code == 404


def test_version(stack: Stack) -> None:
    reply = httpx.get(stack.url + "/version", timeout=10).json()
    assert set(reply) == {"version"} and reply["version"][0].isdigit()


def test_echo_with_logprobs_and_prompt_logprobs_as_vllm_returns_them(
        stack: Stack, tokenizer: Any, default_model_dir) -> None:
    prompt = "def parse(x):"
    ids = tokenizer.encode(prompt)
    body = httpx.post(stack.url + "/v1/completions", timeout=60, json={
        "model": stack.model, "prompt": prompt, "max_tokens": 3, "temperature": 0,
        "logprobs": 2, "echo": True}).json()
    [choice] = body["choices"]
    lp = choice["logprobs"]
    total = len(ids) + 3
    assert choice["text"].startswith(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == \
        len(lp["text_offset"]) == total
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    reference = torch.log_softmax(hf_logits(default_model_dir, ids), dim=-1)
    for pos in range(1, len(ids)):
        entry = plp[pos]
        mine = entry[str(ids[pos])]
        assert set(mine) == {"logprob", "rank", "decoded_token"}
        assert mine["logprob"] == pytest.approx(reference[pos - 1, ids[pos]].item(), abs=1e-4)
        assert mine["rank"] == int((reference[pos - 1] > reference[pos - 1, ids[pos]]).sum()) + 1
        assert lp["token_logprobs"][pos] == pytest.approx(mine["logprob"], abs=1e-6)
        assert len(entry) <= 3  # the token plus the top 2
        assert {v["rank"] for k, v in entry.items() if k != str(ids[pos])} <= {1, 2}


def test_prompt_logprobs_on_chat_and_refused_when_streamed(stack: Stack) -> None:
    body = httpx.post(stack.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "prompt_logprobs": 1}).json()
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == \
        body["usage"]["prompt_tokens"]
    streamed = httpx.post(stack.url + "/v1/completions", timeout=60, json={
        "prompt": "hi", "max_tokens": 2, "prompt_logprobs": 1, "stream": True})
    assert streamed.status_code == 400


@pytest.mark.parametrize("usage", [None, {"include_usage": True},
                                   {"include_usage": True, "continuous_usage_stats": True}])
def test_chat_stream_opens_with_a_role_only_chunk_and_never_sends_usage_null(
        stack: Stack, usage: dict | None) -> None:
    body: dict = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4,
                  "n": 2, "seed": 1, "stream": True}
    if usage:
        body["stream_options"] = usage
    events = _sse(httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60))
    firsts: dict[int, dict] = {}
    for event in events:
        for c in event["choices"]:
            firsts.setdefault(c["index"], c)
    for index in (0, 1):
        assert firsts[index]["delta"] == {"role": "assistant", "content": ""}
        assert firsts[index]["finish_reason"] is None
    assert all("role" not in c["delta"] for e in events for c in e["choices"]
               if c is not firsts[c["index"]])
    continuous = bool(usage and usage.get("continuous_usage_stats"))
    for event in events[:-1] if usage else events:
        assert ("usage" in event) == continuous
        assert event.get("usage", {}) is not None
    if usage:
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 7])
def test_a_sequence_ending_inside_a_character_does_not_end_with_fffd(
        stack: Stack, max_tokens: int) -> None:
    # "𝄞" is four byte-level tokens in this tokenizer; the grammar makes the model write
    # three of them (no eos before), so max_tokens cuts the text inside a character
    ask: dict = {"model": stack.model, "prompt": "clef:", "max_tokens": max_tokens,
                 "extra_body": {"guided_regex": "𝄞{3}"}, "seed": 2}
    whole = stack.client().completions.create(**ask).choices[0]
    streamed = "".join(c.choices[0].text for c in stack.client().completions.create(
        stream=True, **ask) if c.choices)
    assert whole.text == streamed == "𝄞" * (max_tokens // 4)
    assert whole.finish_reason == "length"
