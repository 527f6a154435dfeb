"""Tool-call parsers: what a model's text becomes (content, calls) whole or streamed.

Each parser is run over the whole text at once and over the same text in every chunking
tried here (one character at a time, and random cuts): the calls, and the arguments
assembled from the streamed deltas, must be the same, as OpenAI clients rebuild them.
"""

from __future__ import annotations

import json
import random

import pytest

from router.tool_parsers import (
    HermesStream,
    Llama3JsonStream,
    NamedStream,
    RequiredStream,
    ToolStream,
    scan_call,
)
from router.tools import ToolConfig, ToolMode, ToolPlan, resolve


def _run(stream: ToolStream, pieces: list[str]) -> tuple[str, dict[int, dict]]:
    """Feed ``pieces``; return the streamed content and the calls rebuilt from deltas."""
    content = ""
    calls: dict[int, dict] = {}
    for piece in pieces:
        step = stream.feed(piece)
        content += step.content
        for d in step.tool_deltas:
            _absorb(calls, d.to_dict())
    step = stream.finish()
    content += step.content
    for d in step.tool_deltas:
        _absorb(calls, d.to_dict())
    return content, calls


def _absorb(calls: dict[int, dict], delta: dict) -> None:
    """What an OpenAI client does with a tool_calls delta."""
    if "id" in delta:
        assert delta["index"] not in calls, "a call was named twice"
        calls[delta["index"]] = {"id": delta["id"], "name": delta["function"]["name"],
                                 "arguments": delta["function"]["arguments"]}
    else:
        assert delta["index"] in calls, "arguments before the call's name"
        calls[delta["index"]]["arguments"] += delta["function"]["arguments"]


def _chunkings(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    out = [[text], list(text)]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1)))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def _check_all_chunkings(make, text: str) -> tuple[str, list]:
    results = []
    for pieces in _chunkings(text):
        stream = make()
        content, streamed = _run(stream, pieces)
        whole = [(c.name, c.arguments) for c in stream.calls]
        assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == whole
        assert [c["id"] for _, c in sorted(streamed.items())] == [c.id for c in stream.calls]
        results.append((content, whole, stream.failed))
    assert all(r == results[0] for r in results), "chunking changed the result"
    return results[0][0], results[0][1]


HERMES = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"days": [1, 2], "note": "a } in \\" a string"}}\n</tool_call>\n<tool_call>\n'
          '{"arguments": {}, "name": "now"}\n</tool_call>')


def test_hermes_finds_every_call_and_the_content_before_them() -> None:
    content, calls = _check_all_chunkings(HermesStream, HERMES)
    assert content == "Let me check."
    assert calls[0][0] == "get_weather"
    assert json.loads(calls[0][1]) == {"city": "Paris", "days": [1, 2],
                                       "note": 'a } in " a string'}
    assert calls == [calls[0], ("now", "{}")]


def test_hermes_without_calls_is_all_content_even_with_a_lone_angle_bracket() -> None:
    text = "a < b and <tool_ is not a call"
    content, calls = _check_all_chunkings(HermesStream, text)
    assert content == text and calls == []


def test_hermes_accepts_an_unterminated_last_block_whose_json_is_whole() -> None:
    content, calls = _check_all_chunkings(
        HermesStream, '<tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert content == "" and calls == [("f", '{"x": 1}')]


def test_hermes_with_broken_json_fails_so_the_text_stays_content() -> None:
    stream = HermesStream()
    _run(stream, ['<tool_call>{"name": "f", "arguments": {"x": </tool_call>'])
    assert stream.failed and not stream.calls


def test_llama3_json_calls_separated_by_semicolons_with_or_without_the_tag() -> None:
    text = ('{"name": "a", "parameters": {"q": "x;y"}}; '
            '{"name": "b", "arguments": {"n": 2.5e3}}')
    for prefix in ("", "<|python_tag|>", "  "):
        content, calls = _check_all_chunkings(Llama3JsonStream, prefix + text)
        assert content == ""
        assert calls == [("a", '{"q": "x;y"}'), ("b", '{"n": 2.5e3}')]


def test_llama3_json_plain_text_is_content() -> None:
    content, calls = _check_all_chunkings(Llama3JsonStream, "The weather is fine.")
    assert content == "The weather is fine." and calls == []
    content, calls = _check_all_chunkings(Llama3JsonStream, "<|python")  # only a prefix
    assert content == "<|python" and calls == []


def test_required_array_of_calls() -> None:
    text = '[{"name": "f", "parameters": {"a": [1, {"b": "]"}]}}, {"name": "g", "parameters": {}}]'
    content, calls = _check_all_chunkings(RequiredStream, text)
    assert content == "" and calls == [("f", '{"a": [1, {"b": "]"}]}'), ("g", "{}")]


def test_named_function_text_is_its_arguments() -> None:
    content, calls = _check_all_chunkings(lambda: NamedStream("get"), '{"city": "Oslo"}')
    assert content == "" and calls == [("get", '{"city": "Oslo"}')]


def test_a_number_at_the_end_of_the_text_is_not_cut_short() -> None:
    scan = scan_call('{"name": "f", "arguments": 12', ("arguments",))
    assert scan.args_start is not None and scan.args_end is None  # 12 may become 123


def test_finish_reason_is_tool_calls_only_when_calls_were_made() -> None:
    auto = ToolPlan(ToolMode.AUTO, parser="hermes")
    with_call, without = HermesStream(), HermesStream()
    _run(with_call, ['<tool_call>{"name": "f", "arguments": {}}</tool_call>'])
    _run(without, ["just text"])
    assert auto.finish_reason(with_call, "stop") == "tool_calls"
    assert auto.finish_reason(without, "stop") == "stop"
    named = ToolPlan(ToolMode.NAMED, function="f")
    stream = named.stream()
    assert stream is not None
    _run(stream, ["{}"])
    assert named.finish_reason(stream, "stop") == "stop"  # as OpenAI reports a forced call


TOOLS = [{"type": "function", "function": {
    "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]


def test_tool_choice_modes_resolve_as_openai_defines_them() -> None:
    flags = ToolConfig("hermes", enable_auto=True)
    auto = resolve(TOOLS, None, None, flags)
    assert auto.plan == ToolPlan(ToolMode.AUTO, parser="hermes") and auto.spec is None
    assert resolve(TOOLS, "none", None, flags).plan == ToolPlan(ToolMode.NONE)
    required = resolve(TOOLS, "required", False, flags)
    schema = json.loads(required.spec.value)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1  # parallel_tool_calls false
    named = resolve(TOOLS, {"type": "function", "function": {"name": "f"}}, None, flags)
    assert json.loads(named.spec.value) == TOOLS[0]["function"]["parameters"]
    assert named.template_tools == TOOLS


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_needs_both_flags_as_in_vllm(choice) -> None:
    from router.errors import APIError

    with pytest.raises(APIError, match="enable-auto-tool-choice"):
        resolve(TOOLS, choice, None, ToolConfig("hermes", enable_auto=False))
