"""The router's HTTP routes (FastAPI): the OpenAI API, health, metrics and the pool view.

Request bodies are read and validated here by hand (JSON, then the endpoint's pydantic
model) rather than by FastAPI's body parameters, so malformed JSON and wrong types are a 400
in OpenAI's shape, never FastAPI's 422. A client that disconnects cancels its request, down
to the decode pod (``router.serving``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from engine.errors import PdserveError
from engine.tokenizer import TokenBytes
from router.errors import APIError, from_validation, install_handlers, invalid
from router.metrics import RouterMetrics
from router.pools import Pools
from router.preprocess import (ModelInfo, check_model, prepare_chat, prepare_completion)
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.responses import collect, sse_stream
from router.serving import Generation

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class RouterConfig:
    decode: list[str]  # host:port of each decode pod
    prefill: list[str]  # host:port of each prefill pod (may be empty: decode prefills)
    api_key: str | None = None
    poll_interval: float = 0.5


@dataclass(slots=True)
class RouterState:
    info: ModelInfo
    config: RouterConfig
    metrics: RouterMetrics
    token_bytes: TokenBytes
    pools: Pools | None = None  # opened in the app's lifespan (grpc.aio needs the loop)

    def require_pools(self) -> Pools:
        if self.pools is None:
            raise APIError(503, "the router is starting", "server_overloaded")
        return self.pools


class _APIKeyMiddleware:
    """401 for /v1/* without ``Authorization: Bearer <key>``.

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware would put
    every SSE chunk through an extra task and memory stream.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = APIError(401, "Incorrect API key provided.",
                                    "invalid_request_error", code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Disconnected(Exception):
    pass


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Disconnected()
    return task.result()


async def _parse(request: Request, model: type[M]) -> M:
    body = await request.body()

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


async def _prepend(first: str | None, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk


def build_app(info: ModelInfo, config: RouterConfig) -> FastAPI:
    state = RouterState(info, config, RouterMetrics(info.name), TokenBytes(info.tokenizer))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pools = Pools.connect(config.decode, config.prefill, config.poll_interval)
        pools.on_poll.append(state.metrics.update_pods)
        await pools.start()
        state.pools = pools
        try:
            yield
        finally:
            state.pools = None
            await pools.close()

    app = FastAPI(title="pdserve router", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.router = state
    install_handlers(app)

    if config.api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=config.api_key)

    def model_card() -> dict:
        return {"id": info.name, "object": "model", "created": 0, "owned_by": "pdserve",
                "root": info.name, "max_model_len": info.max_model_len}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        check_model(model, info)
        return model_card()

    async def generate(request: Request, model: type[M],
                       prepare: Callable[[M, ModelInfo], Any]) -> Response:
        try:
            job = prepare(await _parse(request, model), info)
        except (APIError, PdserveError) as exc:
            state.metrics.request_failed(getattr(exc, "status", None)
                                         or getattr(exc, "http_status", 500))
            raise
        gen = Generation(job, state.require_pools(), info.tokenizer, state.metrics)
        try:
            if not job.stream:
                return JSONResponse(await _until_disconnect(request, collect(gen,
                                                                             state.token_bytes)))
            # Wait for the first chunk before answering, so that a pod's refusal (overload,
            # bad input) still gets its own HTTP status instead of an error inside a 200.
            chunks = sse_stream(gen, state.token_bytes)
            try:
                first = await _until_disconnect(request, anext(chunks))
            except StopAsyncIteration:
                first = None
            return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        except _Disconnected:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, prepare_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, prepare_chat)

    @app.get("/health")
    async def health() -> dict:
        # Liveness: the router itself answers. Readiness (a decode pod to send to): /ready.
        pools = state.pools
        return {"status": "ok", "model": info.name,
                "healthy_decode": sum(1 for p in pools.decode if p.healthy) if pools else 0}

    @app.get("/ready")
    async def ready() -> Response:
        pools = state.pools
        if pools is None or not any(p.healthy for p in pools.decode):
            return APIError(503, "no healthy decode pod", "server_overloaded").response()
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/pools")
    async def pools_view() -> dict:
        pools = state.require_pools()
        await pools.poll()  # fresh numbers, not up to one poll interval old
        return pools.describe()

    return app
