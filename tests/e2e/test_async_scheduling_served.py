"""Async scheduling served (the GPU default, here forced on for CPU pods): through 1 prefill
+ 1 decode pod started with ``--async-scheduling``, the openai client gets transformers'
greedy tokens, streamed and not; seeded sampled and JSON-constrained requests give the
tokens the session's pods (async scheduling off) give; a stream dropped mid-way leaves no
request running and every block free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from e2e_helpers import POD_ARGS, Stack, collect_stream, completion_choices, start_stack
from hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(300)

PROMPT = "def fibonacci(n):\n    "
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "kind": {"enum": ["a", "bb"]}},
          "required": ["name", "n", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def pipelined(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-async"),
                     "--prefill", "1", "--decode", "1",
                     "--pod-args", POD_ARGS + " --async-scheduling") as s:
        yield s


def test_greedy_streamed_and_not_equal_transformers(pipelined: Stack, tokenizer) -> None:
    client = pipelined.client()
    params = {"max_tokens": 24, "temperature": 0,
              "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    [whole] = completion_choices(client.completions.create(
        model=pipelined.model, prompt=PROMPT, **params))
    assert whole.token_ids == hf_greedy(pipelined.model_dir,
                                        [list(tokenizer.encode(PROMPT))], 24)[0]
    [streamed], _ = collect_stream(client.completions.create(
        model=pipelined.model, prompt=PROMPT, stream=True, **params), chat=False)
    assert streamed == whole


def test_seeded_and_constrained_outputs_equal_the_synchronous_pods(pipelined: Stack,
                                                                   stack: Stack) -> None:
    asks = [{"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 7, "n": 2,
             "extra_body": {"ignore_eos": True, "repetition_penalty": 1.2}},
            {"prompt": "A record:", "max_tokens": 80, "temperature": 1.0, "seed": 3,
             "extra_body": {"guided_json": SCHEMA}}]
    for ask in asks:
        got = [c.text for c in pipelined.client().completions.create(
            model=pipelined.model, **ask).choices]
        want = [c.text for c in stack.client().completions.create(model=stack.model,
                                                                   **ask).choices]
        assert got == want
    jsonschema.validate(json.loads(got[0]), SCHEMA)


def test_a_dropped_stream_frees_every_block(pipelined: Stack) -> None:
    before = pipelined.wait_decode_idle()
    # no logprobs: every row's token is left on the device between steps
    stream = pipelined.client().completions.create(
        model=pipelined.model, prompt=PROMPT, max_tokens=1900, temperature=0, stream=True,
        n=2, extra_body={"ignore_eos": True})
    try:
        chunks = iter(stream)
        for _ in range(5):
            next(chunks)
        deadline = time.monotonic() + 3.0  # /pools shows the pods' load as last polled
        while sum(p["running"] for p in pipelined.decode_pods()) < 1:
            assert time.monotonic() < deadline, "the request never showed as running"
            time.sleep(0.05)
    finally:
        stream.close()
    after = pipelined.wait_decode_free(before, timeout=2.0)
    assert after == before, f"blocks not freed after the close: {after} != {before}"
