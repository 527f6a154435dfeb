"""The router's serving path against a scripted decode pod over real gRPC.

The scripted pod echoes the prompt (sequence i starts i tokens in), so every expected text
and count follows from the tokenizer alone: these tests pin the router's half of the
contract (streaming, stop strings, usage, n, logprobs, cancellation, error mapping).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from router_helpers import MODEL_NAME, RouterProcess, start_router
from scripted_decode import Script, ScriptedPod

from engine.tokenizer import apply_chat_template, load_tokenizer

PROMPT = "Hello 你好, world. STOP now"
ASCII = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def router(tiny_model: Path, scripted_pod: ScriptedPod,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    proc = start_router(tiny_model, [scripted_pod.address], tmp_path_factory.mktemp("router"))
    yield proc
    proc.stop()


@pytest.fixture()
def script(scripted_pod: ScriptedPod) -> Iterator[Script]:
    s = scripted_pod.script
    s.delay, s.tokens_per_step, s.fail = 0.0, 1, None
    yield s
    s.delay, s.tokens_per_step, s.fail = 0.0, 1, None


@pytest.fixture()
def client(router: RouterProcess, script: Script) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0,
                         timeout=20.0)


@pytest.fixture()
def http(router: RouterProcess, script: Script) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=router.url, timeout=20.0) as c:
        yield c


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data payloads of an SSE body, JSON-decoded, ending with the literal [DONE]."""
    out: list[dict | str] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_completion_returns_the_pods_tokens_as_text_with_exact_usage(client, tok) -> None:
    ids = tok.encode(PROMPT)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=len(ids))
    assert r.choices[0].text == PROMPT
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ids))
    assert r.usage.total_tokens == 2 * len(ids)
    assert r.usage.prompt_tokens_details.cached_tokens == len(ids) // 2
    assert r.model == MODEL_NAME and r.object == "text_completion"


@pytest.mark.parametrize("tokens_per_step", [1, 3])
def test_streamed_text_equals_non_streamed_text(client, script, tok, tokens_per_step) -> None:
    script.tokens_per_step = tokens_per_step
    n_tokens = len(tok.encode(PROMPT)) + 4  # wraps around to "Hello " (whole characters)
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=n_tokens)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT,
                                            max_tokens=n_tokens, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert all("\ufffd" not in t for t in texts)  # never half a character
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(http) -> None:
    r = http.post("/v1/completions", json={"prompt": ASCII, "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])


def test_continuous_usage_stats_count_up_to_the_total(http, tok) -> None:
    r = http.post("/v1/completions", json={
        "prompt": ASCII, "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = [e for e in sse_events(r) if isinstance(e, dict)]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 6
    assert all(e["usage"]["prompt_tokens"] == len(tok.encode(ASCII)) for e in events)


def first_tokens_containing(tok, ids: list[int], needle: str) -> int:
    return next(k for k in range(1, len(ids) + 1) if needle in tok.decode(ids[:k]))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_cancels_the_pod(client, script, tok, stream) -> None:
    script.delay = 0.01  # so that the pod is still generating when the stop string comes
    ids = tok.encode(PROMPT)
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=3 * len(ids), stop=["STOP"])
    before = len(script.requests)
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kwargs)
        text, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    assert text == "Hello 你好, world. " and finish == "stop"
    # Tokens count as generated up to the one that completed the stop string.
    assert usage.completion_tokens == first_tokens_containing(tok, ids, "STOP")
    request_id = script.requests[before].request_id
    assert wait_for(lambda: request_id in script.cancelled, 1.0)


def test_include_stop_str_in_output(http) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 40,
                                           "stop": "STOP", "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["text"] == "Hello 你好, world. STOP"


def test_stop_token_ids_reach_the_pod(http, tok) -> None:
    ids = tok.encode(ASCII)
    r = http.post("/v1/completions", json={"prompt": ASCII, "max_tokens": 40,
                                           "stop_token_ids": [ids[3]], "return_token_ids": True})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["token_ids"] == ids[:4]
    assert choice["prompt_token_ids"] == ids


def rotated_text(tok, ids: list[int], seq: int, count: int) -> str:
    return tok.decode([ids[(seq + j) % len(ids)] for j in range(count)])


def test_n_choices_come_from_one_generate_call(client, script, tok) -> None:
    ids = tok.encode(ASCII)
    before = len(script.requests)
    r = client.completions.create(model=MODEL_NAME, prompt=ASCII, max_tokens=5, n=3, seed=7)
    assert len(script.requests) == before + 1 and script.requests[-1].sampling.n == 3
    assert script.requests[-1].sampling.seed == 7
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [rotated_text(tok, ids, i, 5) for i in range(3)]
    assert r.usage.completion_tokens == 15 and r.usage.prompt_tokens == len(ids)
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=ASCII, max_tokens=5, n=3,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]


def test_batch_of_prompts_text_and_token_ids(http, tok) -> None:
    a, b = "alpha beta", "gamma delta"
    expected = [rotated_text(tok, tok.encode(p), i, 3) for p in (a, b) for i in range(2)]
    for prompt in ([a, b], [tok.encode(a), tok.encode(b)]):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3,
                                               "n": 2}).json()
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in r["choices"]] == expected
        assert r["usage"]["prompt_tokens"] == len(tok.encode(a)) + len(tok.encode(b))
        assert r["usage"]["completion_tokens"] == 12


def test_completion_logprobs_shape(http, tok) -> None:
    r = http.post("/v1/completions", json={"prompt": ASCII, "max_tokens": 6,
                                           "logprobs": 2}).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(v == -0.25 for v in lp["token_logprobs"])
    assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"])


def test_chat_matches_the_template_and_streams_the_same_text(client, tok) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    ids = apply_chat_template(tok, messages)
    expected = tok.decode(ids, skip_special_tokens=True)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                       max_completion_tokens=len(ids),
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids) == r.usage.completion_tokens
    # Without ignore_eos the pod stops at the template's <|im_end|> (eos), which counts.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=parts,
                                                 max_tokens=len(ids), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "user\nhi there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == ids.index(tok.eos_token_id) + 1


def test_chat_logprobs_shape(client) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 == r.usage.completion_tokens
    for entry in content:
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert entry.logprob == -0.25 and len(entry.top_logprobs) == 2
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                                max_tokens=4, logprobs=True, top_logprobs=2,
                                                stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]


def test_client_disconnect_cancels_the_stream_on_the_pod(router, script) -> None:
    script.delay = 0.05
    before = len(script.requests)
    with httpx.Client(base_url=router.url, timeout=10.0) as c, c.stream(
            "POST", "/v1/completions", json={
                "prompt": ASCII, "max_tokens": 500, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    closed_at = time.monotonic()
    request_id = script.requests[before].request_id
    assert wait_for(lambda: request_id in script.cancelled, 1.0)
    assert script.cancelled[request_id] - closed_at < 1.0


def test_client_timeout_cancels_a_non_streamed_request(router, script) -> None:
    script.delay = 0.05
    before = len(script.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{router.url}/v1/completions", json={"prompt": ASCII, "max_tokens": 500},
                   timeout=httpx.Timeout(10.0, read=0.5))
    assert wait_for(lambda: len(script.requests) > before, 1.0)
    request_id = script.requests[before].request_id
    assert wait_for(lambda: request_id in script.cancelled, 1.5)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
    (grpc.StatusCode.INTERNAL, 500),
])
def test_pod_errors_map_to_http_statuses(http, script, code, status) -> None:
    script.fail = code
    for stream in (False, True):
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                               "stream": stream})
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_pools_and_metrics_after_requests(http, script, client) -> None:
    client.completions.create(model=MODEL_NAME, prompt=ASCII, max_tokens=2)
    pods = http.get("/pools").json()["pods"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["role"] == "decode" and pod["healthy"] is True
    assert (pod["free_blocks"], pod["total_blocks"], pod["running"]) == (100, 100, 0)
    text = http.get("/metrics").text
    assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"}' in text
    ttft_count = next(line for line in text.splitlines()
                      if line.startswith("vllm:time_to_first_token_seconds_count"))
    assert float(ttft_count.split()[-1]) >= 1


def test_echo_prepends_the_prompt_streamed_or_not(http) -> None:
    body = {"prompt": ASCII, "max_tokens": 3, "echo": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert whole.startswith(ASCII) and len(whole) > len(ASCII)
    events = sse_events(http.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole
