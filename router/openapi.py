"""The router's OpenAPI document (/openapi.json), accurate to the bodies it accepts.

The routes read their bodies by hand (``router.app``: OpenAI's 400 instead of FastAPI's
422), so FastAPI alone would describe them without a request body. Here each POST route
gets its pydantic model's JSON schema as its request body, and every route its error
answers in OpenAI's shape, so API clients and fuzzers (tests/e2e/test_fuzz_router.py) see
what the router takes. /docs stays off: the document is for programs.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

# POST route -> the model its body must match
REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error the router answers: OpenAI's shape."""

    error: ErrorDetail


_ERRORS = {
    "400": "bad input (malformed JSON, a wrong type or range, a limit exceeded)",
    "401": "missing or wrong API key (/v1/* and /pools, when the router has one)",
    "404": "unknown model or route",
    "502": "a pod is unreachable or failed",
    "503": "no healthy decode pod, or the pods are overloaded",
    "504": "a pod did not answer in time",
}


def _schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """Component schemas of ``models`` and of the models they use."""
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def build_openapi(app: FastAPI, api_key: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible API of pdserve's router")
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(
        _schemas([*REQUEST_BODIES.values(), ErrorResponse]))
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            model = REQUEST_BODIES.get(path) if method == "post" else None
            if model is not None:
                op["requestBody"] = {"required": True, "content": _json(model.__name__)}
            if path.startswith("/v1/completions") or path.startswith("/v1/chat"):
                op["responses"]["200"]["content"]["text/event-stream"] = {
                    "schema": {"type": "string"}}  # with "stream": true
            op["responses"].pop("422", None)  # FastAPI's; the router says 400
            keyed = api_key and (path.startswith("/v1") or path == "/pools")
            if keyed:
                op["security"] = [{"bearer": []}]
            if model is None and not path.startswith("/v1"):
                continue  # health, metrics, version, pools: no client errors
            for status, what in _ERRORS.items():
                if status != "401" or keyed:
                    op["responses"].setdefault(status, {"description": what,
                                                        "content": _json("ErrorResponse")})
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 bodies
        components["schemas"].pop(unused, None)
    return doc


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Serve the document built above (once, on first request) at /openapi.json."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cached:
            cached.update(build_openapi(app, api_key))
        return cached

    app.openapi = openapi  # type: ignore[method-assign]
