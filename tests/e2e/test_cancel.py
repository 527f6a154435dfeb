"""A client that closes its stream mid-way cancels the request down to the decode pod.

The decode pod's free KV blocks (``GET /pools``) are back at their value before the request
within one second of the close, for completions and chats alike.
"""

from __future__ import annotations

import time

import httpx
import pytest
from e2e_helpers import Stack

pytestmark = pytest.mark.timeout(120)

PROMPT = "class Parser:\n    def __init__(self, text):\n        self.text = text\n"
# Most of the context, two sequences and logprobs: several seconds of decoding even for the
# tiny model (it makes about 1000 tokens/s here), so blocks that are free within 1 s of the
# close were freed by the cancel, not by the request running out.
LONG = 1900


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_closing_a_stream_frees_its_blocks_within_a_second(stack: Stack, endpoint: str) -> None:
    before = stack.wait_decode_idle()
    client = stack.client()
    common = dict(model=stack.model, max_tokens=LONG, temperature=0, stream=True, n=2,
                  extra_body={"ignore_eos": True})
    if endpoint == "chat":
        stream = client.chat.completions.create(
            messages=[{"role": "user", "content": PROMPT}], logprobs=True, top_logprobs=5,
            **common)
    else:
        stream = client.completions.create(prompt=PROMPT, logprobs=5, **common)
    try:
        chunks = iter(stream)
        for _ in range(5):
            next(chunks)
        # the request really is running there and holding blocks before the close (the
        # pods' load in /pools is as last polled, every 0.5 s: read until a poll shows it)
        deadline = time.monotonic() + 3.0
        while True:
            during = stack.decode_pods()
            if sum(p["running"] for p in during) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sum(p["running"] for p in during) >= 1, during
        assert sum(p["free_blocks"] for p in during) < sum(before.values())
    finally:
        stream.close()
    closed = time.monotonic()
    after = stack.wait_decode_free(before, timeout=1.0)
    waited = time.monotonic() - closed
    assert after == before, f"blocks not freed {waited:.2f} s after the close: {after} != {before}"
    assert all(p["running"] == 0 for p in stack.decode_pods())


def test_a_client_giving_up_on_a_whole_response_frees_its_blocks(stack: Stack) -> None:
    before = stack.wait_decode_idle()
    body = {"model": stack.model, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "n": 2, "logprobs": 5}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    closed = time.monotonic()
    after = stack.wait_decode_free(before, timeout=1.0)
    waited = time.monotonic() - closed
    assert after == before, f"blocks not freed {waited:.2f} s after the close: {after} != {before}"
