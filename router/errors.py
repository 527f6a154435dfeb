"""Errors the router answers with, always in OpenAI's shape.

``{"error": {"message", "type", "param", "code"}}`` for every failure: bad input (400, never
a 5xx), a bad API key (401), an unknown model or route (404), an overloaded or unreachable
backend (503/502). gRPC status codes from the pods map to HTTP statuses here, in one place.
"""

from __future__ import annotations

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import PdserveError

# gRPC code -> (HTTP status, OpenAI error type). Anything unlisted is a 500.
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "server_overloaded"),
    grpc.StatusCode.UNAVAILABLE: (502, "upstream_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "upstream_timeout"),
    grpc.StatusCode.FAILED_PRECONDITION: (500, "upstream_error"),
}


class APIError(Exception):
    """An HTTP error answer in OpenAI's shape; raise it anywhere below a route."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    @classmethod
    def from_pdserve(cls, exc: PdserveError) -> APIError:
        return cls(exc.http_status, exc.message, exc.error_type, exc.param)

    @classmethod
    def from_grpc(cls, exc: grpc.aio.AioRpcError, pod: str) -> APIError:
        status, kind = _GRPC_TO_HTTP.get(exc.code(), (500, "upstream_error"))
        detail = exc.details() or exc.code().name
        message = detail if status == 400 else f"decode pod {pod}: {detail}"
        return cls(status, message, kind, code=exc.code().name.lower())


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_validation(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic complaint, phrased for a client: where it is and what is wrong."""
    errors = exc.errors()
    if not errors:
        return invalid("invalid request")
    first = errors[0]
    raw = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type name to the location ("prompt.str"); drop those.
    loc = [p for p in raw if p.isdigit() or not (p[:1].isupper() or "[" in p or p in _TYPE_TAGS)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if len(loc) < len(raw):  # a union: the first member's complaint alone would mislead
        message = f"none of the accepted types matches (first: {message})"
    if param:
        message = f"{param}: {message}"
    return invalid(message, param)


# Type tags pydantic puts into union error locations.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none",
              "function-after", "function-before", "function-wrap"})


def install_handlers(app: FastAPI) -> None:
    """Make every error FastAPI or Starlette would answer come out in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(PdserveError)
    async def _pdserve_error(_: Request, exc: PdserveError) -> JSONResponse:
        return APIError.from_pdserve(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; OpenAI (and its clients) say 400 for a malformed request.
        return from_validation(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: still answer in OpenAI's shape (Starlette logs the
        # traceback). The body names no exception: its text could echo internals or input.
        return APIError(500, "internal error (the router's log has the details)",
                        "internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()
