"""Structured output and tool calls through the official openai client, over 1 prefill +
1 decode pod (the first token is sampled, and masked, on the prefill pod) and colocated.

The model has random weights: its free output is gibberish, so every valid JSON document,
choice, regex match or tool call here is the grammar's doing. Seeded requests must give
identical outputs in both modes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from e2e_helpers import POD_ARGS, Stack, start_stack

pytestmark = pytest.mark.timeout(600)

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 10},
        "price": {"type": "number", "minimum": 0},
        "status": {"enum": ["new", "used", "refurbished"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "seller": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 8},
                                  "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                                  "verified": {"type": "boolean"}},
                   "required": ["name", "rating"], "additionalProperties": False},
    },
    "required": ["id", "name", "status", "seller"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                  "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def colocated(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-colocated-so"),
                     "--mode", "colocated", "--decode", "1", "--pod-args", POD_ARGS,
                     "--router-args=--enable-auto-tool-choice --tool-call-parser hermes"
                     ) as s:
        yield s


async def _one(client: openai.AsyncOpenAI, model: str, i: int) -> list[tuple[str, str]]:
    """Request i of the fifty: chat or completions, each way of asking for a schema."""
    seed, n = 1000 + i, 3 if i % 5 == 0 else 1
    common: dict[str, Any] = {"model": model, "seed": seed, "n": n, "temperature": 1.0,
                              "max_tokens": 220}
    way = i % 4
    if way == 0:
        r = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Item {i} as JSON"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "item", "schema": SCHEMA}}, **common)
        return [(c.message.content or "", c.finish_reason) for c in r.choices]
    if way == 1:
        r = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Item {i}"}],
            extra_body={"structured_outputs": {"json": SCHEMA}}, **common)
        return [(c.message.content or "", c.finish_reason) for c in r.choices]
    body = {"guided_json": SCHEMA} if way == 2 else {"response_format": {
        "type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}}
    r = await client.completions.create(prompt=f"item {i}: ", extra_body=body, **common)
    return [(c.text, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]


def _fifty(stack: Stack) -> list[list[tuple[str, str]]]:
    async def run() -> list[list[tuple[str, str]]]:
        client = stack.async_client()
        try:
            return list(await asyncio.gather(*(_one(client, stack.model, i)
                                               for i in range(50))))
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def fifty_disaggregated(stack: Stack) -> list[list[tuple[str, str]]]:
    return _fifty(stack)


def test_fifty_seeded_schema_requests_all_validate(fifty_disaggregated) -> None:
    outputs = [o for req in fifty_disaggregated for o in req]
    assert len(outputs) == 40 * 1 + 10 * 3
    for text, finish in outputs:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _ in outputs}) > 50  # sampled: not one forced document


def test_seeded_constrained_outputs_are_identical_colocated_and_disaggregated(
        fifty_disaggregated, colocated: Stack) -> None:
    assert _fifty(colocated) == fifty_disaggregated


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_guided_choice_and_regex(stack: Stack, colocated: Stack, mode: str) -> None:
    s = stack if mode == "disaggregated" else colocated
    client = s.client()
    choices = ["apple pie", "banana", "cherry tart"]
    r = client.completions.create(model=s.model, prompt="fruit:", n=4, seed=3, max_tokens=30,
                                  temperature=1.0, extra_body={"guided_choice": choices})
    assert all(c.text in choices for c in r.choices)
    assert all(c.finish_reason == "stop" for c in r.choices)
    pattern = r"[A-Z]{2}-[0-9]{3,5}"
    chat = client.chat.completions.create(
        model=s.model, messages=[{"role": "user", "content": "code?"}], n=3, seed=4,
        max_tokens=30, extra_body={"guided_regex": pattern})
    assert all(re.fullmatch(pattern, c.message.content) for c in chat.choices)
    streamed = client.chat.completions.create(
        model=s.model, messages=[{"role": "user", "content": "code?"}], seed=4,
        max_tokens=30, stream=True, extra_body={"structured_outputs": {"regex": pattern}})
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == chat.choices[0].message.content


def _validate_call(call: Any, tool: dict) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def _streamed_calls(stream: Any) -> tuple[dict[int, dict], str | None, bool]:
    calls: dict[int, dict] = {}
    finish, first_role_only = None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        if first_role_only is None:
            first_role_only = c.delta.role == "assistant" and not c.delta.tool_calls
        for d in c.delta.tool_calls or []:
            got = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                got["id"], got["name"] = d.id, d.function.name
            got["arguments"] += d.function.arguments or ""
        finish = c.finish_reason or finish
    return calls, finish, bool(first_role_only)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_a_named_tool_call_validates_streamed_and_not(stack: Stack, colocated: Stack,
                                                      mode: str) -> None:
    s = stack if mode == "disaggregated" else colocated
    client = s.client()
    ask: dict[str, Any] = {
        "model": s.model, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER, TIME], "seed": 11, "max_tokens": 80,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    reply = client.chat.completions.create(**ask)
    message = reply.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    _validate_call(message.tool_calls[0], WEATHER)
    assert reply.choices[0].finish_reason == "stop"  # as OpenAI reports a forced call
    calls, finish, role_first = _streamed_calls(client.chat.completions.create(
        stream=True, **ask))
    assert role_first and finish == "stop" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == message.tool_calls[0].function.arguments  # same seed


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_tool_choice_calls_known_tools_with_valid_arguments(stack: Stack,
                                                                     stream: bool) -> None:
    client = stack.client()
    # parallel_tool_calls false: exactly one call (a random model would otherwise append
    # calls until max_tokens; several calls are the parsers' tests' business)
    ask: dict[str, Any] = {
        "model": stack.model, "messages": [{"role": "user", "content": "Help"}],
        "tools": [WEATHER, TIME], "tool_choice": "required", "seed": 5, "max_tokens": 200, "n": 2,
        "temperature": 1.0, "parallel_tool_calls": False}
    tools = {t["function"]["name"]: t for t in (WEATHER, TIME)}
    if not stream:
        reply = client.chat.completions.create(**ask)
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls"
            assert len(choice.message.tool_calls) == 1
            for call in choice.message.tool_calls:
                _validate_call(call, tools[call.function.name])
        return
    ask["n"] = 1
    whole = client.chat.completions.create(**ask).choices[0].message.tool_calls
    calls, finish, _ = _streamed_calls(client.chat.completions.create(stream=True, **ask))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_tools_are_rendered_by_the_chat_template(colocated: Stack) -> None:
    import httpx

    messages = [{"role": "user", "content": "Weather?"}]
    plain = httpx.post(colocated.url + "/tokenize", json={"messages": messages}).json()
    with_tools = httpx.post(colocated.url + "/tokenize",
                            json={"messages": messages, "tools": [WEATHER]}).json()
    assert with_tools["count"] > plain["count"] + 20
    reply = colocated.client().chat.completions.create(
        model=colocated.model, messages=messages, tools=[WEATHER], tool_choice="none",
        max_tokens=2, temperature=0)
    assert reply.usage.prompt_tokens == with_tools["count"]


def test_auto_tool_choice_returns_plain_text_when_the_model_calls_nothing(
        colocated: Stack, stack: Stack) -> None:
    ask: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER],
                           "max_tokens": 12, "temperature": 0,
                           "extra_body": {"ignore_eos": True}}
    reply = colocated.client().chat.completions.create(model=colocated.model, **ask)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    # the disaggregated stack was started without a parser: auto is refused, as in vLLM
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        stack.client().chat.completions.create(model=stack.model, **ask)


def test_an_invalid_schema_is_a_400_through_the_client(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        stack.client().chat.completions.create(
            model=stack.model, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {
                    "a": {"type": "string", "pattern": "(unclosed"}}}}})
    assert "regex" in str(err.value) or "pattern" in str(err.value)
