"""Through 1 prefill + 1 decode pod: n with a seed, stop strings, logprobs, usage, metrics."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import httpx
import pytest
import torch
from e2e_helpers import Stack, chat_choices, collect_stream, completion_choices, extra
from hf_reference import hf_logits

from engine.tokenizer import apply_chat_template

pytestmark = pytest.mark.timeout(180)

PROMPT = "def parse_args(argv):\n    "
IDS = {"ignore_eos": True, "return_token_ids": True}


def test_n3_with_a_seed_gives_three_choices_reproducibly(stack: Stack) -> None:
    client = stack.client()
    ask = dict(model=stack.model, prompt=PROMPT, n=3, seed=1234, temperature=1.0,
               max_tokens=16, extra_body=IDS)
    first = completion_choices(client.completions.create(**ask))
    again = completion_choices(client.completions.create(**ask))
    streamed, _chunks = collect_stream(client.completions.create(stream=True, **ask), chat=False)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.text for c in first] == [c.text for c in again]
    assert streamed == first, "a streamed request with the same seed sampled differently"
    assert len(first) == 3 and all(len(c.token_ids) == 16 for c in first)
    assert all(c.finish_reason == "length" for c in first)
    # three samples of a near-uniform distribution: identical ones would mean n forked the
    # same random stream three times
    assert len({tuple(c.token_ids) for c in first}) > 1
    other = completion_choices(client.completions.create(**{**ask, "seed": 4321}))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_n3_usage_counts_every_choice_and_chat_n3_works(stack: Stack, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = stack.client().chat.completions.create(
        model=stack.model, messages=messages, n=3, seed=7, temperature=1.0, max_tokens=8,
        extra_body=IDS)
    choices = chat_choices(reply)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.prompt_tokens == len(apply_chat_template(tokenizer, messages))
    assert reply.usage.completion_tokens == sum(len(c.token_ids) for c in choices) == 24


def _stop_string(text: str) -> tuple[str, int]:
    """A short stop string that first occurs well inside ``text``, and where."""
    for match in re.finditer(r"[A-Za-z0-9_]{2,4}", text):
        stop = match.group()
        at = text.find(stop)
        if at >= 3:
            return stop, at
    raise AssertionError(f"no usable stop string in the greedy text {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_cuts_the_text_before_it(stack: Stack, tokenizer: Any, stream: bool
                                             ) -> None:
    client = stack.client()
    ask = dict(model=stack.model, prompt=PROMPT, max_tokens=32, temperature=0, extra_body=IDS)
    [free] = completion_choices(client.completions.create(**ask))
    stop, at = _stop_string(free.text)

    if stream:
        [cut], chunks = collect_stream(client.completions.create(
            stop=[stop], stream=True, stream_options={"include_usage": True}, **ask),
            chat=False)
        usage = chunks[-1].usage
    else:
        reply = client.completions.create(stop=[stop], **ask)
        [cut] = completion_choices(reply)
        usage = reply.usage
    assert cut.text == free.text[:at], f"stop {stop!r} did not cut the text right before it"
    assert cut.finish_reason == "stop"
    # the tokens generated up to the one completing the stop string, and no more
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids)
    assert stop not in tokenizer.decode(cut.token_ids[:-1])
    assert usage.completion_tokens == len(cut.token_ids)


def test_completion_logprobs_have_the_requested_shape_and_values(stack: Stack,
                                                                 tokenizer: Any) -> None:
    reply = stack.client().completions.create(model=stack.model, prompt=PROMPT, max_tokens=8,
                                              temperature=0, logprobs=3, extra_body=IDS)
    choice = reply.choices[0]
    ids = extra(choice, "token_ids")
    lp = choice.logprobs
    n = reply.usage.completion_tokens
    assert n == len(ids) == 8
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert len(lp.text_offset) == n
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=False):
        assert len(top) == 3, top
        # greedy: the chosen token is the most likely one
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))
        assert logprob <= 0.0
    # the values are the model's: log-softmax of transformers' logits at each position
    prompt_ids = list(tokenizer.encode(PROMPT))
    logits = hf_logits(stack.model_dir, prompt_ids + ids)
    want = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    got = [want[i, t].item() for i, t in enumerate(ids)]
    assert lp.token_logprobs == pytest.approx(got, abs=1e-3)


def test_chat_logprobs_have_the_requested_shape(stack: Stack) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    ask = dict(model=stack.model, messages=messages, max_tokens=8, temperature=0,
               logprobs=True, top_logprobs=2, extra_body=IDS)
    client = stack.client()
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = [c for c in client.chat.completions.create(stream=True, **ask) if c.choices]
    tokens = [e.token for c in streamed if c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    assert not any(math.isnan(e.logprob) for e in content)


def test_router_metrics_are_prometheus_text_with_ttft(stack: Stack) -> None:
    stack.client().completions.create(model=stack.model, prompt=PROMPT, max_tokens=4,
                                      temperature=0)
    reply = httpx.get(stack.url + "/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    count = re.search(r"^vllm:time_to_first_token_seconds_count\{[^}]*\} (\S+)$", text,
                      re.MULTILINE)
    assert count is not None and float(count.group(1)) >= 1
    assert "vllm:inter_token_latency_seconds" in text


def test_raw_sse_is_data_lines_of_json_ending_in_done(stack: Stack) -> None:
    body = {"model": stack.model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
