"""GenerateStream on a real decode pod: many requests over one stream, batched per step.

Each request's items must be exactly what its own Generate call streams (the same greedy
tokens), a step's tokens for all requests must travel together (far fewer messages than
items), a cancelled request must stop and free its blocks while the others go on, a bad
request must end alone with its status, and a draining pod must refuse new requests with
UNAVAILABLE while it finishes the running ones.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from pod_helpers import Pod, free_blocks, generate_on, start_pod

from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import sampling_to_proto

pytestmark = pytest.mark.timeout(180)
LONG = 1900  # tokens: most of the model's 2,048-token context


@dataclass
class Seen:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    ends: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (code, details)
    messages: int = 0
    items: int = 0
    error: grpc.RpcError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Stream:
    """One GenerateStream call, written through a queue and read on a thread."""

    def __init__(self, pod: Pod) -> None:
        self.channel = grpc.insecure_channel(pod.address)
        self.outgoing: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self.seen = Seen()
        self.call = pb_grpc.DecodeStub(self.channel).GenerateStream(self._requests(),
                                                                    timeout=120)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[pb.StreamRequest]:
        while (message := self.outgoing.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                with self.seen.lock:
                    self.seen.messages += 1
                    for item in message.items:
                        self.seen.items += 1
                        if item.end:
                            self.seen.ends[item.request_id] = (item.code, item.details)
                        for out in item.response.outputs:
                            self.seen.tokens.setdefault(item.request_id, []).extend(
                                out.token_ids)
        except grpc.RpcError as exc:  # a drained pod exits: the test checks what came before
            self.seen.error = exc
        finally:
            self.seen.done.set()

    def start(self, *requests: tuple[str, list[int], int]) -> None:
        self.outgoing.put(pb.StreamRequest(start=[pb.GenerateStart(request=pb.GenerateRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(
                SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))))
            for rid, prompt, n in requests]))

    def wait_ended(self, *rids: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(r in self.seen.ends for r in rids):
            assert time.monotonic() < deadline, (rids, self.seen.ends)
            time.sleep(0.01)

    def wait_tokens(self, rid: str, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen.tokens.get(rid, [])) < n:
            assert time.monotonic() < deadline, (rid, self.seen.tokens.get(rid))
            time.sleep(0.01)

    def close(self) -> None:
        self.outgoing.put(None)  # half-close: the pod ends the stream once all have ended
        assert self.seen.done.wait(30)
        assert self.seen.error is None, self.seen.error
        self.channel.close()


@pytest.fixture
def decode_pod(model_factory: Callable[..., Path]) -> Iterator[Pod]:
    # four times the default model's size: long requests run for seconds on 2 cores
    pod = start_pod("decode", model_factory(layers=4, hidden=128), "--kv-connector", "none")
    yield pod
    pod.stop(signal.SIGKILL)


def _prompt(i: int) -> list[int]:
    return [(7 * i + j) % 900 + 3 for j in range(5 + 3 * i)]


def test_requests_on_one_stream_match_their_own_calls_and_share_messages(
        decode_pod: Pod) -> None:
    blocks = free_blocks(decode_pod)
    stream = Stream(decode_pod)
    requests = [(f"r{i}", _prompt(i), 24) for i in range(8)]
    stream.start(*requests)
    stream.wait_ended(*(rid for rid, _, _ in requests))
    stream.close()
    assert all(code == 0 for code, _ in stream.seen.ends.values()), stream.seen.ends
    for rid, prompt, n in requests:
        alone, _ = generate_on(decode_pod, "", prompt, n)
        assert stream.seen.tokens[rid] == alone, rid
    # 8 x 24 tokens plus an end each: one message per step carries all the requests'
    # items, so there are about as many messages as steps, not as items
    assert stream.seen.items >= 8 * 24 + 8
    assert stream.seen.messages <= stream.seen.items // 4, (stream.seen.messages,
                                                            stream.seen.items)
    assert free_blocks(decode_pod) == blocks


def test_cancel_bad_request_and_drain_end_only_their_own_request(decode_pod: Pod) -> None:
    stream = Stream(decode_pod)
    stream.start(("keep", _prompt(1), LONG), ("drop", _prompt(2), LONG))
    stream.wait_tokens("drop", 5)
    # a request without an id, and one the engine refuses, fail alone
    bad = pb.GenerateRequest(request_id="bad", prompt_token_ids=[1, 2],
                             sampling=pb.SamplingParams(temperature=-1.0, max_tokens=4, n=1))
    stream.outgoing.put(pb.StreamRequest(cancel=["drop"], start=[
        pb.GenerateStart(request=pb.GenerateRequest(prompt_token_ids=[1, 2])),
        pb.GenerateStart(request=bad)]))
    stream.wait_ended("", "bad")
    assert stream.seen.ends[""][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert stream.seen.ends["bad"] == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                       "temperature must be non-negative, got -1.0")

    decode_pod.proc.send_signal(signal.SIGTERM)  # drain: "keep" runs on, new work is refused
    time.sleep(0.2)
    stream.start(("late", _prompt(3), 4))
    stream.wait_ended("late")
    assert stream.seen.ends["late"][0] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "keep" not in stream.seen.ends, "the test's request ended before the drain began"
    with stream.seen.lock:
        dropped = len(stream.seen.tokens["drop"])
    time.sleep(0.3)
    assert len(stream.seen.tokens["drop"]) == dropped < LONG  # it stopped
    assert "drop" not in stream.seen.ends  # cancelled: nobody waits for its end
    stream.wait_ended("keep", timeout=120)
    assert stream.seen.ends["keep"] == (0, "")
    assert len(stream.seen.tokens["keep"]) == LONG
