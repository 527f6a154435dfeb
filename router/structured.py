"""Structured-output request fields -> one ``StructuredOutputSpec``, checked before any pod.

Accepted, as OpenAI and vLLM spell them (on chat and completions alike):
- ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``;
- vLLM's ``structured_outputs``: ``{"json": schema, "regex": ..., "choice": [...],
  "grammar": ..., "json_object": true}`` (exactly one);
- vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
At most one of them may constrain a request. ``GrammarCheck`` compiles the spec with the
served tokenizer (cached) so that an invalid schema, regex or grammar is a 400 here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from engine.errors import InvalidRequestError
from engine.grammar import GrammarCompiler, llguidance_tokenizer
from engine.structured_spec import GuideKind, StructuredOutputSpec
from router.errors import invalid

_VLLM_KEYS = {"json": GuideKind.JSON, "regex": GuideKind.REGEX, "choice": GuideKind.CHOICE,
              "grammar": GuideKind.GRAMMAR, "json_object": GuideKind.JSON_OBJECT}


def _schema_spec(schema: Any, param: str) -> StructuredOutputSpec:
    if isinstance(schema, str):  # vLLM accepts a schema as JSON text too
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise invalid(f"{param} is not valid JSON: {exc}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise invalid(f"{param} must be a JSON schema object", param)
    return StructuredOutputSpec.json_schema(schema)


def _spec(kind: GuideKind, value: Any, param: str) -> StructuredOutputSpec:
    if kind is GuideKind.JSON:
        return _schema_spec(value, param)
    if kind is GuideKind.JSON_OBJECT:
        if value is not True:
            raise invalid(f"{param} must be true when given", param)
        return StructuredOutputSpec(GuideKind.JSON_OBJECT)
    if kind is GuideKind.CHOICE:
        if not isinstance(value, list) or not value or not all(
                isinstance(c, str) and c for c in value):
            raise invalid(f"{param} must be a non-empty list of non-empty strings", param)
        return StructuredOutputSpec.choice(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"{param} must be a non-empty string", param)
    return StructuredOutputSpec(kind, value)


def _response_format(fmt: dict[str, Any]) -> StructuredOutputSpec | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec(GuideKind.JSON_OBJECT)
    if kind == "json_schema":
        body = fmt.get("json_schema")
        if not isinstance(body, dict):
            raise invalid("response_format.json_schema must be an object with a 'schema'",
                          "response_format")
        schema = body.get("schema", body.get("json_schema"))
        if schema is None:
            raise invalid("response_format.json_schema.schema is required", "response_format")
        return _schema_spec(schema, "response_format.json_schema.schema")
    raise invalid(f"response_format type {kind!r} is not supported (text, json_object, "
                  "json_schema)", "response_format")


def spec_from_request(req: Any) -> StructuredOutputSpec | None:
    """The request's one structured-output spec, or None; a 400 for conflicts."""
    found: list[tuple[str, StructuredOutputSpec]] = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        given = {k: v for k, v in req.structured_outputs.items()
                 if v is not None and v is not False}
        unknown = sorted(set(given) - set(_VLLM_KEYS))
        if unknown:
            raise invalid(f"structured_outputs: unsupported key(s) {unknown}; supported: "
                          f"{sorted(_VLLM_KEYS)}", "structured_outputs")
        for key, value in given.items():
            found.append((f"structured_outputs.{key}",
                          _spec(_VLLM_KEYS[key], value, f"structured_outputs.{key}")))
    for name, kind in (("guided_json", GuideKind.JSON), ("guided_regex", GuideKind.REGEX),
                       ("guided_choice", GuideKind.CHOICE),
                       ("guided_grammar", GuideKind.GRAMMAR)):
        value = getattr(req, name)
        if value is not None:
            found.append((name, _spec(kind, value, name)))
    if len(found) > 1:
        raise invalid("only one kind of structured output may be requested, got "
                      + ", ".join(name for name, _ in found), found[1][0])
    return found[0][1] if found else None


class GrammarCheck:
    """Compiles specs with the served tokenizer (once each, cached) to refuse bad ones."""

    def __init__(self, tokenizer: Any, vocab_size: int, timeout_s: float = 10.0) -> None:
        eos = tokenizer.eos_token_id
        self.compiler = GrammarCompiler(
            lambda: llguidance_tokenizer(tokenizer, vocab_size, [eos] if eos is not None
                                         else []), timeout_s)

    async def check(self, spec: StructuredOutputSpec | None) -> None:
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.compiler.compile, spec)
        except InvalidRequestError as exc:
            raise invalid(exc.message, exc.param, "invalid_structured_output") from None

    def close(self) -> None:
        self.compiler.close()
