"""A property-based fuzz of the router (schemathesis, from its served /openapi.json).

Against the real 1P+1D stack, schemathesis sends bodies made from each route's schema, both
valid ones and ones that break it (wrong types, missing fields, odd strings). Whatever
comes: no 5xx, no traceback or exception name in any body, every error in OpenAI's shape.
Bounded: a fixed number of examples per route (under a minute in all on 2 cores); valid
bodies name the served model and generation requests are capped at 8 new tokens, so that
examples cost milliseconds, not a full context of decoding each.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import schemathesis
from e2e_helpers import Stack
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

EXAMPLES = 20  # per route and mode
GENERATION_EXAMPLES = 100  # per mode, for the two routes that reach the pods
# Names of Python exceptions, or a traceback's lines, must never reach a client.
TRACEBACK = re.compile(r"Traceback|File \"")
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")


def _steer(body: Any, model: str, mode: GenerationMode) -> None:
    """Valid bodies name the served model (else most are a 404) and ask for few tokens."""
    if not isinstance(body, dict):
        return
    if mode is GenerationMode.POSITIVE and isinstance(body.get("model"), str):
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) \
                and body[key] > 8:
            body[key] = 8
    if "messages" in body and body.get("max_tokens") is None:
        body.setdefault("max_completion_tokens", 8)  # chat's default is the whole context


def assert_sane(response: Any) -> None:
    status = response.status_code
    text = response.text
    assert status < 500, f"{status}: {text[:500]}"
    assert not TRACEBACK.search(text), text[:500]
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert not EXCEPTION_NAME.search(error["message"]), error


def _fuzz(operation: Any, mode: GenerationMode, model: str, statuses: Counter[str]) -> None:
    examples = GENERATION_EXAMPLES if "completions" in operation.path else EXAMPLES

    @given(operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def one(case: Any) -> None:
        _steer(case.body, model, mode)
        response = case.call(timeout=60)
        statuses[f"{operation.method.upper()} {operation.path} {response.status_code}"] += 1
        assert_sane(response)

    one()


def test_no_input_makes_the_router_fail(stack: Stack) -> None:
    # (schemathesis' own pytest plugin does not run under pytest 9: drive hypothesis here)
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    schema = schema.exclude(path_regex="^/(metrics|pools)$")  # plain GETs, covered elsewhere
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    statuses: Counter[str] = Counter()
    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE, stack.model, statuses)
        if operation.method.upper() == "POST":  # a GET has nothing to break (any string
            _fuzz(operation, GenerationMode.NEGATIVE, stack.model, statuses)  # is a name)
    print(sorted(statuses.items()))
    # the valid bodies did reach the pods: some generations succeeded
    assert statuses["POST /v1/completions 200"] > 0, statuses
    assert statuses["POST /v1/chat/completions 200"] > 0, statuses
