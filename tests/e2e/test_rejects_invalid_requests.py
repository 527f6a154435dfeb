"""Invalid requests get a 400 (404: unknown model) in OpenAI's error shape, never a 5xx.

Sent raw with httpx (the openai client cannot send malformed JSON or wrong types), streamed
and not; the same system then still serves a valid request. The context is the model's
``max_position_embeddings`` (``GET /v1/models`` says ``max_model_len``).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from e2e_helpers import Stack

pytestmark = pytest.mark.timeout(120)

MODEL = "<served>"  # replaced by the stack's model name
CONTEXT = "<context>"  # replaced by the context length

COMPLETION = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# name -> (endpoint, body, expected status, the `param` OpenAI's error names, if it must)
CASES: dict[str, tuple[str, Any, int, str | None]] = {
    "malformed json": ("completions", b'{"model": "x", "prompt": "a",', 400, None),
    "malformed json chat": ("chat/completions", b'{"messages": [}', 400, None),
    "not utf-8": ("completions", b'{"prompt": "\xff\xfe"}', 400, None),
    "body not an object": ("completions", [1, 2, 3], 400, None),
    "empty body": ("chat/completions", b"", 400, None),
    "NaN temperature": ("completions", b'{"prompt": "a", "temperature": NaN}', 400, None),
    "prompt missing": ("completions", {"model": MODEL, "max_tokens": 4}, 400, "prompt"),
    "prompt a number": ("completions", {**COMPLETION, "prompt": 12}, 400, "prompt"),
    "prompt ids not ints": ("completions", {**COMPLETION, "prompt": [1, "a", 2]}, 400, "prompt"),
    "prompt id outside vocabulary": ("completions", {**COMPLETION, "prompt": [1, 10**9]}, 400,
                                     "prompt"),
    "max_tokens a string": ("completions", {**COMPLETION, "max_tokens": "5"}, 400,
                            "max_tokens"),
    "temperature a string": ("completions", {**COMPLETION, "temperature": "hot"}, 400,
                             "temperature"),
    "n a bool": ("completions", {**COMPLETION, "n": True}, 400, "n"),
    "stream a string": ("completions", {**COMPLETION, "stream": "yes"}, 400, "stream"),
    "messages a string": ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    "message without role": ("chat/completions", {**CHAT, "messages": [{"content": "hi"}]},
                             400, None),
    "messages empty": ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    "image part": ("chat/completions",
                   {**CHAT, "messages": [{"role": "user", "content": [
                       {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
                   400, None),
    "unknown model": ("completions", {**COMPLETION, "model": "no-such-model"}, 404, "model"),
    "unknown model chat": ("chat/completions", {**CHAT, "model": "no-such-model"}, 404,
                           "model"),
    "max_tokens 0": ("completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens negative": ("completions", {**COMPLETION, "max_tokens": -3}, 400,
                            "max_tokens"),
    "max_completion_tokens 0": ("chat/completions", {**CHAT, "max_completion_tokens": 0}, 400,
                                "max_tokens"),
    "max_tokens beyond the context": ("completions", {**COMPLETION, "max_tokens": CONTEXT},
                                      400, "max_tokens"),
    "max_tokens far beyond the context": ("chat/completions",
                                          {**CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    "temperature below 0": ("completions", {**COMPLETION, "temperature": -0.5}, 400,
                            "temperature"),
    "temperature below 0 chat": ("chat/completions", {**CHAT, "temperature": -1}, 400,
                                 "temperature"),
    "prompt ids longer than the context": ("completions",
                                           {**COMPLETION, "prompt": ["<ids of context+1>"]},
                                           400, "prompt"),
    "prompt exactly the context": ("completions", {**COMPLETION, "prompt": ["<ids of context>"]},
                                   400, "prompt"),
    "text prompt longer than the context": ("completions",
                                            {**COMPLETION, "prompt": "<text of context>"},
                                            400, "prompt"),
    "chat longer than the context": ("chat/completions",
                                     {**CHAT, "messages": [{"role": "user",
                                                            "content": "<text of context>"}]},
                                     400, "messages"),
    "n above the limit": ("completions", {**COMPLETION, "n": 17}, 400, "n"),
    "n far above the limit": ("chat/completions", {**CHAT, "n": 100000}, 400, "n"),
    "n 0": ("completions", {**COMPLETION, "n": 0}, 400, "n"),
    "logprobs above the limit": ("completions", {**COMPLETION, "logprobs": 21}, 400,
                                 "logprobs"),
    "top_p 0": ("completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
}


def _fill(value: Any, stack: Stack, context: int) -> Any:
    """Put the stack's model name and context-sized prompts into a case's body."""
    if isinstance(value, dict):
        return {k: _fill(v, stack, context) for k, v in value.items()}
    if isinstance(value, list):
        if value == ["<ids of context+1>"]:
            return [7] * (context + 1)
        if value == ["<ids of context>"]:
            return [7] * context
        return [_fill(v, stack, context) for v in value]
    if value == MODEL:
        return stack.model
    if value == CONTEXT:
        return context  # with any prompt at all, prompt + max_tokens passes the context
    if value == "<text of context>":
        return " x" * context  # at least one token per " x"
    return value


@pytest.fixture(scope="module")
def context(stack: Stack) -> int:
    card = httpx.get(f"{stack.url}/v1/models", timeout=10).json()["data"][0]
    return card["max_model_len"]


def _post(stack: Stack, endpoint: str, body: Any) -> httpx.Response:
    url = f"{stack.url}/v1/{endpoint}"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, timeout=30,
                          headers={"content-type": "application/json"})
    return httpx.post(url, json=body, timeout=30)


def _assert_openai_error(reply: httpx.Response, status: int, param: str | None) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error"), error
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_request_gets_an_openai_error(stack: Stack, context: int, name: str) -> None:
    endpoint, body, status, param = CASES[name]
    reply = _post(stack, endpoint, _fill(body, stack, context))
    _assert_openai_error(reply, status, param)
    if isinstance(body, dict) and status in (400, 404) and "stream" not in body:
        # streamed, the same request is refused with the same status (not a 200 with an
        # error event inside)
        streamed = _post(stack, endpoint, {**_fill(body, stack, context), "stream": True})
        _assert_openai_error(streamed, status, param)


def test_the_openai_client_sees_these_errors_as_its_own_exceptions(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="a", max_tokens=2)
    assert missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=stack.model, max_tokens=0,
                                       messages=[{"role": "user", "content": "a"}])
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=stack.model, prompt="a", temperature=-1, stream=True)


def test_after_the_invalid_requests_the_system_still_serves(stack: Stack) -> None:
    health = httpx.get(stack.url + "/health", timeout=10)
    assert health.status_code == 200
    reply = stack.client().completions.create(model=stack.model, prompt="def f(x):",
                                              max_tokens=4, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 4
    assert all(p["healthy"] for p in stack.pools()["pods"])


# Integers the JSON accepts but the pods' gRPC messages cannot carry (int32 top_k and
# stop_token_ids, int64 seed): a client's mistake, so a 400 like any other range error.
OUT_OF_RANGE: dict[str, tuple[str, dict, str]] = {
    "seed beyond int64": ("completions", {**COMPLETION, "seed": 2**63}, "seed"),
    "seed far beyond int64": ("chat/completions", {**CHAT, "seed": 2**70}, "seed"),
    "top_k beyond int32": ("completions", {**COMPLETION, "top_k": 2**40}, "top_k"),
    "stop_token_ids beyond int32": ("chat/completions", {**CHAT, "stop_token_ids": [2**40]},
                                    "stop_token_ids"),
}


@pytest.mark.parametrize("name", list(OUT_OF_RANGE))
def test_integers_out_of_the_wire_range_get_a_400(stack: Stack, context: int, name: str
                                                  ) -> None:
    endpoint, body, param = OUT_OF_RANGE[name]
    for stream in (False, True):
        reply = _post(stack, endpoint, {**_fill(body, stack, context), "stream": stream})
        assert reply.status_code < 500, f"{reply.status_code}: {reply.text}"
        _assert_openai_error(reply, 400, None)
        assert (reply.json()["error"]["param"] or "").startswith(param), reply.text
