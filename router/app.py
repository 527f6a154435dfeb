"""The router's HTTP routes (FastAPI): the OpenAI API, health, metrics and the pool view.

Request bodies are read and validated here by hand (JSON, then the endpoint's pydantic
model) rather than by FastAPI's body parameters, so malformed JSON and wrong types are a 400
in OpenAI's shape, never FastAPI's 422. A client that disconnects cancels its request, down
to the decode pod (``router.serving``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from engine.errors import PdserveError
from engine.tokenizer import TokenBytes
from engine.tracing import Tracing, start_tracing
from protos.security import LinkSecurity
from router.body import parse_json_object, read_body
from router.discovery import Discovery, DnsResolver, parse_endpoint
from router.errors import APIError, from_validation, install_handlers
from router.limits import RequestLimits
from router.metrics import RouterMetrics
from router.openapi import install_openapi
from router.policy import RoutingPolicy, make_policy
from router.pools import Pools, Role, connect
from router.preprocess import ModelInfo, check_model, prepare_chat, prepare_completion
from router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from router.responses import collect, sse_stream
from router.serving import Generation
from router.structured import GrammarCheck
from router.tokenize_pool import OffloadingTokenizer
from router.tools import ToolConfig
from router.utility import detokenize, model_card, tokenize, version

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class RouterConfig:
    # Endpoints (router.discovery): host:port of one pod, or dns:NAME:PORT for every address
    # of a (headless Service's) DNS name, re-resolved while the router runs.
    decode: list[str]
    prefill: list[str]  # may be empty: decode pods prefill themselves
    api_key: str | None = None
    poll_interval: float = 0.5
    dns_server: tuple[str, int] | None = None  # None: the system's resolver configuration
    discovery_interval: float = 2.0
    tools: ToolConfig = field(default_factory=ToolConfig)
    otlp_endpoint: str | None = None  # HOST:PORT of an OTLP/gRPC collector (engine.tracing)
    routing: str = "prefix"  # router.policy.ROUTINGS
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Threads that tokenize, template and detokenize requests off the event loop. Few:
    # tokenizers releases the GIL while it encodes, but turning a long encoding into Python
    # objects holds it, and more threads than cores only add GIL convoys (docs/RELIABILITY.md).
    prepare_threads: int = 2
    # Processes that encode texts over 64 KiB (router.tokenize_pool); 0: in the threads.
    tokenize_processes: int = 2
    # TLS and the service token on the links to the pods (protos.security)
    security: LinkSecurity = field(default_factory=LinkSecurity)


@dataclass(slots=True)
class RouterState:
    info: ModelInfo
    config: RouterConfig
    metrics: RouterMetrics
    token_bytes: TokenBytes
    grammar: GrammarCheck
    prepare_pool: ThreadPoolExecutor
    created: int = field(default_factory=lambda: int(time.time()))
    pools: Pools | None = None  # opened in the app's lifespan (grpc.aio needs the loop)
    policy: RoutingPolicy | None = None
    discovery: Discovery | None = None
    tracing: Tracing | None = None

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (tokenizing, templating, detokenizing) on the prepare threads,
        so that a megabyte prompt does not stall every other client's request."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prepare_pool, functools.partial(fn, *args))

    def require_pools(self) -> Pools:
        if self.pools is None:
            raise APIError(503, "the router is starting", "server_overloaded")
        return self.pools

    def current_info(self) -> ModelInfo:
        """serving_info() once the pools are up, config.json's before."""
        return self.serving_info() if self.pools is not None else self.info

    def serving_info(self) -> ModelInfo:
        """The model as the pods serve it now: their reported context limit, not
        config.json's (a pod started with a smaller --max-model-len, or short of KV)."""
        pools = self.require_pools()
        return dataclasses.replace(
            self.info, max_model_len=pools.context_limit(self.info.max_model_len))


class _APIKeyMiddleware:
    """401 for /v1/* and /pools without ``Authorization: Bearer <key>``.

    /health, /ready, /metrics (and /openapi.json, /version) stay open, as vLLM's do:
    probes and Prometheus scrape them without a key, and they tell nothing about requests.
    /pools shows every pod's address and load, so it needs the key.

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware would put
    every SSE chunk through an extra task and memory stream.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v1") or path == "/pools":
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


async def _parse(request: Request, model: type[M], limits: RequestLimits) -> M:
    data = parse_json_object(await read_body(request, limits.max_body_bytes),
                             limits.max_json_depth)
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
    # Requests are prepared with a tokenizer that sends long texts to worker processes.
    offloading = OffloadingTokenizer(info.tokenizer, info.root, config.tokenize_processes)
    prep_info = dataclasses.replace(info, tokenizer=offloading)
    state = RouterState(prep_info, config, RouterMetrics(info.name), TokenBytes(info.tokenizer),
                        GrammarCheck(info.tokenizer, info.vocab_size),
                        ThreadPoolExecutor(config.prepare_threads, "pdserve-prepare"))
    limits = config.limits

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pools = Pools(poll_interval=config.poll_interval,
                      connector=functools.partial(connect, security=config.security))
        pools.on_poll.append(state.metrics.update_pods)
        pools.on_leave.append(state.metrics.forget_pod)
        discovery = Discovery(pools, {Role.DECODE: [parse_endpoint(e) for e in config.decode],
                                      Role.PREFILL: [parse_endpoint(e) for e in config.prefill]},
                              DnsResolver(config.dns_server), config.discovery_interval)
        state.tracing = start_tracing("pdserve-router", config.otlp_endpoint)
        await discovery.start()
        await pools.start()
        policy = make_policy(config.routing, pools, info.model_id)
        state.pools, state.policy, state.discovery = pools, policy, discovery
        try:
            yield
        finally:
            state.pools = state.policy = state.discovery = None
            await discovery.close()
            await pools.close()
            state.grammar.close()
            if state.tracing is not None:
                state.tracing.shutdown()
            state.prepare_pool.shutdown(wait=False, cancel_futures=True)
            offloading.close()

    app = FastAPI(title="pdserve router", version=version()["version"], lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.router = state
    install_handlers(app)
    install_openapi(app, bool(config.api_key))

    if config.api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=config.api_key)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(state.current_info(), state.created)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        check_model(model, info)
        return model_card(state.current_info(), state.created)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict:
        return await state.off_loop(tokenize, await _parse(request, TokenizeRequest, limits),
                                    prep_info)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict:
        return await state.off_loop(detokenize,
                                    await _parse(request, DetokenizeRequest, limits),
                                    prep_info)

    @app.get("/version")
    async def version_route() -> dict:
        return version()

    async def generate(request: Request, model: type[M],
                       prepare: Callable[[M, ModelInfo], Any]) -> Response:
        arrival = time.monotonic()
        try:
            parsed = await _parse(request, model, limits)
            job = await state.off_loop(prepare, parsed, state.serving_info())
            # an invalid schema, regex or grammar is a 400 before any pod sees it
            await state.grammar.check(job.params[0].structured_outputs)
        except (APIError, PdserveError) as exc:
            state.metrics.request_failed(exc.status if isinstance(exc, APIError)
                                         else exc.http_status)
            raise
        assert state.policy is not None
        gen = Generation(job, state.require_pools(), state.policy, info.tokenizer,
                         state.metrics, arrival=arrival, tracing=state.tracing)
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
        return await generate(request, CompletionRequest,
                              lambda req, info: prepare_completion(req, info, limits))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest,
                              lambda req, info: prepare_chat(req, info, config.tools, limits))

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
        view = pools.describe()
        if state.discovery is not None:
            view["discovery"] = state.discovery.describe()
        return view

    return app
