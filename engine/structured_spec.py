"""StructuredOutputSpec: what a constrained request's output must match, as plain data.

One spec per request (``SamplingParams.structured_outputs``): a JSON schema, any JSON
object, a regular expression, one of a list of strings, or a grammar (Lark, or GBNF as
llama.cpp and xgrammar write it). It travels over gRPC as its kind and text
(protos/convert.py) and becomes an llguidance grammar in ``grammar_text``; compiling and
matching live in engine.structured_output. No torch here: the router imports it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError

# JSON is generated compact-with-spaces and without free whitespace: a model (above all a
# random one) could otherwise emit whitespace forever inside a valid document.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SPEC_CHARS = 1 << 20


class GuideKind(enum.Enum):
    JSON = "json"  # value: a JSON schema (JSON text)
    JSON_OBJECT = "json_object"  # value: unused; any JSON object
    REGEX = "regex"  # value: a regular expression (Rust regex syntax)
    CHOICE = "choice"  # value: a JSON list of strings
    GRAMMAR = "grammar"  # value: a Lark or GBNF grammar


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    kind: GuideKind
    value: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg, param="structured_outputs")

        if not isinstance(self.kind, GuideKind):
            bad(f"unknown structured output kind {self.kind!r}")
        if not isinstance(self.value, str):
            bad("a structured output spec must be text")
        if len(self.value) > MAX_SPEC_CHARS:
            bad(f"the {self.kind.value} spec is longer than {MAX_SPEC_CHARS} characters")
        if self.kind is GuideKind.JSON:
            try:
                schema = json.loads(self.value)
            except ValueError as exc:
                bad(f"the JSON schema is not valid JSON: {exc}")
            if not isinstance(schema, (dict, bool)):
                bad("a JSON schema must be an object (or true/false)")
        elif self.kind is GuideKind.CHOICE:
            try:
                choices = json.loads(self.value)
            except ValueError:
                choices = None
            if (not isinstance(choices, list) or not choices
                    or not all(isinstance(c, str) and c for c in choices)):
                bad("a choice must be a non-empty list of non-empty strings")
        elif self.kind in (GuideKind.REGEX, GuideKind.GRAMMAR) and not self.value.strip():
            bad(f"the {self.kind.value} must not be empty")

    @classmethod
    def json_schema(cls, schema: object) -> StructuredOutputSpec:
        # key order kept: the generated object lists properties in the schema's order
        return cls(GuideKind.JSON, json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutputSpec:
        return cls(GuideKind.CHOICE, json.dumps(choices))

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form) that this spec means. Not checked here:
        building a matcher from it reports any error (engine.structured_output)."""
        from llguidance import LLMatcher, grammar_from

        if self.kind is GuideKind.JSON:
            return LLMatcher.grammar_from_json_schema(self.value, overrides=JSON_OPTIONS)
        if self.kind is GuideKind.JSON_OBJECT:
            return LLMatcher.grammar_from_json_schema({"type": "object"},
                                                      overrides=JSON_OPTIONS)
        if self.kind is GuideKind.REGEX:
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind is GuideKind.CHOICE:
            # JSON string literals are Lark string literals: the choices need no escaping.
            alternatives = " | ".join(json.dumps(c) for c in json.loads(self.value))
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        try:  # Lark as is; GBNF converted to Lark
            return grammar_from("grammar", self.value)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid grammar: {exc}",
                                      param="structured_outputs") from None
