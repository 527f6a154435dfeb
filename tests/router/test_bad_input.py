"""The router rejects bad requests itself, in OpenAI's error shape, and never with a 5xx.

The router here points at a decode endpoint where nothing listens: every request below is
answered before any pod would be contacted (or, for a valid request, with a 5xx that says
the backend is missing, which is not the client's fault).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from router_helpers import API_KEY, MODEL_NAME, RouterProcess, free_port, start_router

from engine.sampling_params import MAX_N

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def router(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RouterProcess]:
    proc = start_router(tiny_model, [f"127.0.0.1:{free_port()}"],
                        tmp_path_factory.mktemp("router-bad-input"),
                        "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN))
    yield proc
    proc.stop()


@pytest.fixture()
def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=10.0)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None
                        ) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_wrong_or_missing_api_key_is_401(router: RouterProcess) -> None:
    bad = openai.OpenAI(base_url=f"{router.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401
    assert_openai_error(httpx.post(f"{router.url}/v1/completions",
                                   json={"prompt": "hi"}, timeout=10.0), 401)


def test_health_and_metrics_need_no_key(router: RouterProcess) -> None:
    health = httpx.get(f"{router.url}/health", timeout=10.0)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{router.url}/metrics", timeout=10.0)
    assert metrics.status_code == 200
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:num_requests_running"):
        assert name in metrics.text


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    error = assert_openai_error(http.post("/v1/chat/completions", json={
        "model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_openai_error(http.get("/v1/models/gpt-9"), 404)
    assert_openai_error(http.get("/v1/no-such-route"), 404)


def test_malformed_json_is_400(http: httpx.Client) -> None:
    for body in (b'{"prompt": "hi"', b"\xff\xfe", b"", b"[1, 2]", b'"text"',
                 b'{"prompt": "hi", "temperature": NaN}'):
        assert_openai_error(http.post("/v1/completions", content=body,
                                      headers={"Content-Type": "application/json"}), 400)


def test_json_nested_past_the_parsers_recursion_limit_is_400(http: httpx.Client) -> None:
    body = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    error = assert_openai_error(http.post("/v1/completions", content=body,
                                          headers={"Content-Type": "application/json"}), 400)
    assert error["code"] == "max_json_depth"


def test_temperature_below_zero_is_400(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="hi", temperature=-0.5)
    assert info.value.status_code == 400
    assert_openai_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "temperature": -1}), 400,
        "temperature")


def test_max_tokens_below_one_is_400(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0}),
                        400, "max_tokens")
    assert_openai_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}),
        400, "max_tokens")


def test_max_tokens_beyond_the_context_is_400(http: httpx.Client) -> None:
    error = assert_openai_error(http.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": MAX_MODEL_LEN}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in error["message"]


def test_prompt_longer_than_the_context_is_400(client: openai.OpenAI,
                                               http: httpx.Client) -> None:
    long_text = "word " * (2 * MAX_MODEL_LEN)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=long_text, max_tokens=1)
    assert_openai_error(http.post("/v1/completions", json={
        "prompt": list(range(3, 3 + MAX_MODEL_LEN))}), 400, "prompt")
    assert_openai_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": long_text}]}), 400, "messages")


def test_n_above_the_limit_is_400(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/completions", json={"prompt": "hi", "n": MAX_N + 1}),
                        400, "n")


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("max_tokens", "5"), ("n", True), ("n", 2.5), ("prompt", 5),
    ("prompt", [1, "a"]), ("stream", "yes"), ("stop", 3), ("logprobs", "many"),
    ("seed", 1.5), ("stream_options", "on"), ("top_p", "1"),
])
def test_wrong_types_are_400_naming_the_field(http: httpx.Client, field: str, value) -> None:
    body = {"prompt": "hi", field: value}
    error = assert_openai_error(http.post("/v1/completions", json=body), 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field


# (endpoint, body) pairs that are each wrong in some way; none may be a 5xx.
BAD_BODIES = [
    ("completions", {}),
    ("completions", {"prompt": []}),
    ("completions", {"prompt": ""}),
    ("completions", {"prompt": [[]]}),
    ("completions", {"prompt": [-1, 5]}),
    ("completions", {"prompt": [10 ** 9]}),
    ("completions", {"prompt": "hi", "top_p": 0}),
    ("completions", {"prompt": "hi", "top_k": -5}),
    ("completions", {"prompt": "hi", "min_p": 2}),
    ("completions", {"prompt": "hi", "logprobs": 21}),
    ("completions", {"prompt": "hi", "presence_penalty": 3}),
    ("completions", {"prompt": "hi", "repetition_penalty": 0}),
    ("completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 5}),
    ("completions", {"prompt": "hi", "suffix": "x"}),
    ("completions", {"prompt": "hi", "best_of": 3}),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ("completions", b'{"prompt": "hi", "temperature": 1e400}'),  # infinity
    ("completions", b'{"prompt": "hi", "top_p": -Infinity}'),
    ("chat/completions", {}),
    ("chat/completions", {"messages": []}),
    ("chat/completions", {"messages": "hi"}),
    ("chat/completions", {"messages": [{"content": "hi"}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "top_logprobs": 2}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "logprobs": True, "top_logprobs": 50}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function"}]}),
    # structured output and tools that cannot be served: a 400 before any pod is asked
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"schema": {"type": "objectx"}}}}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "xml"}}),
    ("completions", {"prompt": "hi", "guided_regex": "(("}),
    ("completions", {"prompt": "hi", "guided_choice": []}),
    ("completions", {"prompt": "hi", "guided_grammar": "start: x"}),
    ("completions", {"prompt": "hi", "guided_json": "{not json"}),
    ("completions", {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}),
    ("completions", {"prompt": "hi", "guided_regex": "a",
                     "response_format": {"type": "json_object"}}),
    ("completions", {"prompt": "hi", "prompt_logprobs": 2, "stream": True}),
    ("completions", {"prompt": "hi", "prompt_logprobs": 21}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "tool_choice": "required"}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": {"type": "function", "function": {"name": "g"}}}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function", "function": {
                              "name": "f", "parameters": {"type": "objectx"}}}],
                          "tool_choice": "required"}),
]


@pytest.mark.parametrize("endpoint, body", BAD_BODIES)
def test_bad_input_gets_a_4xx_in_openai_shape(http: httpx.Client, endpoint: str,
                                              body: dict | bytes) -> None:
    if isinstance(body, bytes):
        response = http.post(f"/v1/{endpoint}", content=body,
                             headers={"Content-Type": "application/json"})
    else:
        response = http.post(f"/v1/{endpoint}", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_openai_error(response, response.status_code)


def test_unsupported_content_part_names_the_part(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "input_audio"}]}]}), 400,
        "messages.0.content.0")


def test_valid_request_without_a_reachable_pod_is_a_backend_error(
        client: openai.OpenAI, http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code in (502, 503)
    assert_openai_error(response, response.status_code)
    pools = http.get("/pools").json()["pods"]
    assert [(p["role"], p["healthy"]) for p in pools] == [("decode", False)]
    stream = http.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert stream.status_code in (502, 503)  # refused before any SSE byte was sent
