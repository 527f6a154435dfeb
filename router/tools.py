"""Tool calling for chat requests: ``tools`` and ``tool_choice`` -> a ``ToolPlan``.

As OpenAI and vLLM define them:
- ``none``: the tools are shown to the model (the chat template renders them) but its text
  is plain content;
- ``auto`` (the default when tools are given): free text, parsed for calls by the parser
  the router was started with (``--tool-call-parser``; auto also needs
  ``--enable-auto-tool-choice``, as in vLLM, else a 400);
- ``required``: a grammar makes the output a JSON array of one or more
  ``{"name": <one of the tools>, "parameters": <its schema>}`` objects;
- a named function: a grammar makes the output that function's arguments.
``required`` and named calls are enforced by the grammar, never left to the model.
"""

from __future__ import annotations

import contextlib
import enum
import json
from dataclasses import dataclass
from typing import Any

from engine.structured_spec import StructuredOutputSpec
from router.errors import invalid
from router.tool_parsers import PARSERS, NamedStream, RequiredStream, ToolStream

AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and '
                    "--tool-call-parser to be set")


@dataclass(slots=True, frozen=True)
class ToolConfig:
    """The router's flags."""

    parser: str | None = None  # --tool-call-parser
    enable_auto: bool = False  # --enable-auto-tool-choice

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {self.parser!r}; "
                             f"known: {sorted(PARSERS)}")


class ToolMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(slots=True, frozen=True)
class ToolPlan:
    mode: ToolMode
    parser: str | None = None  # AUTO
    function: str | None = None  # NAMED

    def stream(self) -> ToolStream | None:
        """A fresh parser for one choice's text (None: the text is plain content)."""
        if self.mode is ToolMode.AUTO and self.parser is not None:
            return PARSERS[self.parser]()
        if self.mode is ToolMode.REQUIRED:
            return RequiredStream()
        if self.mode is ToolMode.NAMED:
            assert self.function is not None
            return NamedStream(self.function)
        return None

    def finish_reason(self, stream: ToolStream | None, reason: str | None) -> str | None:
        """OpenAI's: ``tool_calls`` when calls were made (auto, required); a named call
        keeps ``stop`` as OpenAI and vLLM report it."""
        if stream is None or not stream.calls or stream.failed or self.mode is ToolMode.NAMED:
            return reason
        return "tool_calls" if reason == "stop" else reason


@dataclass(slots=True)
class ToolRequest:
    plan: ToolPlan | None  # None: no tools at all
    template_tools: list[dict] | None  # what the chat template renders
    spec: StructuredOutputSpec | None  # the grammar of required / named calls


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        param = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid("only tools of type 'function' are supported", param)
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid("a tool needs function.name (a non-empty string)", param)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid("function.parameters must be a JSON schema object", param)
        if fn["name"] in out:
            raise invalid(f"two tools are named {fn['name']!r}", param)
        out[fn["name"]] = fn
    return out


def _parameters(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def _required_schema(functions: dict[str, dict], parallel: bool) -> dict:
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [name]},
                             "parameters": _parameters(fn)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, fn in functions.items()]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def resolve(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None,
            config: ToolConfig) -> ToolRequest:
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid("tool_choice requires tools", "tool_choice")
        return ToolRequest(None, None, None)
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolRequest(ToolPlan(ToolMode.NONE), tools, None)
    if choice == "auto":
        if not (config.enable_auto and config.parser):
            raise invalid(AUTO_NEEDS_FLAGS, "tool_choice")
        return ToolRequest(ToolPlan(ToolMode.AUTO, parser=config.parser), tools, None)
    if choice == "required":
        spec = StructuredOutputSpec.json_schema(_required_schema(functions, parallel is not False))
        return ToolRequest(ToolPlan(ToolMode.REQUIRED), tools, spec)
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise invalid('a named tool_choice is {"type": "function", "function": '
                          '{"name": ...}}', "tool_choice")
        if name not in functions:
            raise invalid(f"tool_choice names {name!r}, which is not among the tools",
                          "tool_choice")
        spec = StructuredOutputSpec.json_schema(_parameters(functions[name]))
        return ToolRequest(ToolPlan(ToolMode.NAMED, function=name), tools, spec)
    raise invalid("tool_choice must be 'none', 'auto', 'required' or a named function",
                  "tool_choice")


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant's tool call arguments as
    objects (OpenAI sends them as JSON text), as vLLM passes them."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    with contextlib.suppress(ValueError):  # not JSON: the template gets text
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    call = {**call, "function": fn}
                fixed.append(call)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
