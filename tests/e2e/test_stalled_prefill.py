"""A prefill pod that stops answering (SIGSTOP) holds no request for long (issue 11).

Real pods over gRPC. The decode pod has met the prefill pod (one remote prefill), then the
prefill pod is stopped and a request is sent to it: the decode pod's Prefill call hangs,
its liveness pings go unanswered, and after --prefill-first-response-timeout (1 s here) the
request prefills locally -- transformers' greedy tokens, far sooner than --prefill-timeout
(60 s), and every block back. Once the pod continues (SIGCONT) it serves remotely again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hf_reference import hf_greedy
from pod_helpers import Pod, free_blocks, generate_on, start_pod

pytestmark = pytest.mark.timeout(180)

PROMPT = list(range(500, 540))
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pods(default_model_dir: Path) -> Iterator[tuple[Pod, Pod]]:
    prefill = start_pod("prefill", default_model_dir)
    decode = start_pod("decode", default_model_dir, "--prefill-first-response-timeout", "1")
    try:
        yield prefill, decode
    finally:
        prefill.proc.send_signal(signal.SIGCONT)
        prefill.stop()
        decode.stop()


def test_a_stopped_prefill_pod_means_a_local_prefill_within_the_first_response_timeout(
        pods: tuple[Pod, Pod], default_model_dir: Path) -> None:
    prefill, decode = pods
    want = hf_greedy(default_model_dir, [PROMPT], NEW_TOKENS)[0]
    before = free_blocks(decode)
    tokens, remote = generate_on(decode, prefill.address, PROMPT, NEW_TOKENS)
    assert remote and tokens == want
    prefill.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        tokens, remote = generate_on(decode, prefill.address, PROMPT, NEW_TOKENS, timeout=30)
        elapsed = time.monotonic() - started
        assert not remote and tokens == want
        print(f"stalled prefill pod: served locally in {elapsed:.2f} s")
        assert elapsed < 10, f"{elapsed:.1f} s"  # 1 s to give up, then a local prefill
        assert free_blocks(decode) == before
    finally:
        prefill.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 20
    while True:  # the pod is back: remote again
        tokens, remote = generate_on(decode, prefill.address, PROMPT[::-1], NEW_TOKENS)
        if remote or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert remote
    assert free_blocks(decode) == before
