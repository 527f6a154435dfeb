"""Hostile bodies and oversized requests get a 400 in OpenAI's shape that names the limit.

The router here runs with small limits (every ``RequestLimits`` flag set) and points at a
decode endpoint where nothing listens: each request below is refused before any pod would be
contacted, so a 5xx would mean the router itself failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from router_helpers import API_KEY, RouterProcess, free_port, start_router

LIMITS = {"max-body-bytes": 4096, "max-json-depth": 8, "max-prompts": 4,
          "max-prompt-tokens": 40, "max-n": 3, "max-tokens": 20, "max-logprobs": 3,
          "max-stop-strings": 2, "max-stop-string-chars": 8}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def router(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RouterProcess]:
    flags = [item for name, value in LIMITS.items() for item in (f"--{name}", str(value))]
    proc = start_router(tiny_model, [f"127.0.0.1:{free_port()}"],
                        tmp_path_factory.mktemp("router-limits"), "--api-key", API_KEY,
                        "--max-model-len", "512", *flags)
    yield proc
    proc.stop()


def assert_400(response: httpx.Response, param: str | None = None,
               code: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert "Error" not in error["message"] and "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
        if code in {k.replace("-", "_") for k in LIMITS}:
            assert f"--{code.replace('_', '-')}" in error["message"]
    return error


def post_raw(http: httpx.Client, endpoint: str, body: str | bytes) -> httpx.Response:
    return http.post(f"/v1/{endpoint}", content=body,
                     headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", '{"prompt": "a\\ud800b"}', "prompt"),
    ("completions", '{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
    ("completions", '{"prompt": "hi", "model": "\\ud800"}', "model"),
    ("completions", '{"prompt": "hi", "stop": ["\\udc00"]}', "stop.0"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages.0.content"),
    ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\ud800"}]}]}', "messages.0.content.0.text"),
    ("chat/completions", '{"messages": [{"role": "\\ud800", "content": "hi"}]}',
     "messages.0.role"),
])
def test_a_lone_surrogate_is_400_naming_the_field(http: httpx.Client, endpoint: str,
                                                  body: str, param: str) -> None:
    assert_400(post_raw(http, endpoint, body), param, "invalid_unicode")


def test_a_surrogate_pair_is_ordinary_text(http: httpx.Client) -> None:
    # "\ud83d\ude00" is one emoji: accepted, and refused only for the missing pod (5xx).
    response = post_raw(http, "completions", '{"prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert response.status_code in (502, 503), response.text


def test_tokenize_refuses_a_lone_surrogate(http: httpx.Client) -> None:
    response = http.post("/tokenize", content='{"prompt": "\\ud800"}',
                         headers={"Content-Type": "application/json"})
    assert_400(response, "prompt", "invalid_unicode")


@pytest.mark.parametrize("depth", [9, 1000])
def test_deeply_nested_json_is_400(http: httpx.Client, depth: int) -> None:
    body = '{"prompt": "hi", "response_format": ' + "[" * depth + "]" * depth + "}"
    assert_400(post_raw(http, "completions", body), code="max_json_depth")


def test_nesting_within_the_limit_is_checked_by_type(http: httpx.Client) -> None:
    assert_400(post_raw(http, "completions", '{"prompt": [[[[1]]]]}'), "prompt")


@pytest.mark.parametrize("endpoint, body, param, code", [
    ("completions", {"prompt": ["a"] * 5}, "prompt", "max_prompts"),
    ("completions", {"prompt": [[1, 2]] * 5}, "prompt", "max_prompts"),
    ("completions", {"prompt": "word " * 60}, "prompt", "max_prompt_tokens"),
    ("completions", {"prompt": ["word " * 15] * 4}, "prompt", "max_prompt_tokens"),
    ("completions", {"prompt": list(range(3, 50))}, "prompt", "max_prompt_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * 60}]},
     "messages", "max_prompt_tokens"),
    ("completions", {"prompt": "hi", "n": 4, "temperature": 1}, "n", "max_n"),
    ("chat/completions", {**CHAT, "n": 4}, "n", "max_n"),
    ("completions", {"prompt": "hi", "max_tokens": 21}, "max_tokens", "max_tokens"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 21}, "max_tokens", "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 21}, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "hi", "logprobs": 4}, "logprobs", "max_logprobs"),
    ("completions", {"prompt": "hi", "prompt_logprobs": 4}, "prompt_logprobs",
     "max_logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 4}, "top_logprobs",
     "max_logprobs"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop", "max_stop_strings"),
    ("chat/completions", {**CHAT, "stop": ["a", "b", "c"]}, "stop", "max_stop_strings"),
    ("completions", {"prompt": "hi", "stop": "123456789"}, "stop", "max_stop_string_chars"),
    ("completions", {"prompt": "x" * 5000}, None, "max_body_bytes"),
])
def test_each_limit_is_a_400_naming_it(http: httpx.Client, endpoint: str, body: dict,
                                       param: str | None, code: str) -> None:
    assert_400(http.post(f"/v1/{endpoint}", json=body), param, code)


def test_requests_at_the_limits_pass_validation(http: httpx.Client) -> None:
    # Accepted by every check; only the missing decode pod answers (a 5xx, not a 400).
    body = {"prompt": ["word " * 4] * 4, "n": 3, "temperature": 1.0, "max_tokens": 20,
            "logprobs": 3, "stop": ["12345678", "b"]}
    response = http.post("/v1/completions", json=body)
    assert response.status_code in (502, 503), response.text


def test_a_body_without_content_length_is_cut_at_the_limit(router: RouterProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(f"{router.url}/v1/completions", content=chunks(), timeout=10.0,
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Content-Type": "application/json"})
    assert_400(response, code="max_body_bytes")


def test_a_limit_below_one_is_refused_at_start(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="max-prompts must be at least 1"):
        start_router(tiny_model, [f"127.0.0.1:{free_port()}"], tmp_path, "--max-prompts", "0")


def test_openapi_json_describes_the_accepted_bodies(router: RouterProcess) -> None:
    from router.protocol import ChatCompletionRequest, CompletionRequest

    response = httpx.get(f"{router.url}/openapi.json", timeout=10.0)  # open without the key
    assert response.status_code == 200
    doc = response.json()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", CompletionRequest),
                        ("/v1/chat/completions", ChatCompletionRequest)):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert set(schema["properties"]) == set(model.model_fields)
        assert "422" not in op["responses"]
        error_ref = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert set(schemas[error_ref.rsplit("/", 1)[1]]["properties"]) == {"error"}
        assert op["security"] == [{"bearer": []}]
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert httpx.get(f"{router.url}/docs", timeout=10.0).status_code == 404


def test_pools_needs_the_key_and_health_metrics_do_not(router: RouterProcess) -> None:
    assert_openai_error_401 = httpx.get(f"{router.url}/pools", timeout=10.0)
    assert assert_openai_error_401.status_code == 401
    assert assert_openai_error_401.json()["error"]["code"] == "invalid_api_key"
    keyed = httpx.get(f"{router.url}/pools", timeout=10.0,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 200 and "pods" in keyed.json()
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{router.url}{open_path}", timeout=10.0).status_code == 200
