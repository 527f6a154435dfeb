"""Pods refuse a duplicate request id without disturbing the running one, and bad KV
targets and ids fail at once (issue 11).

Straight to the session stack's pods over gRPC, as a client other than the router might.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from e2e_helpers import Stack
from hf_reference import hf_greedy

from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import sampling_to_proto

pytestmark = pytest.mark.timeout(120)

PROMPT = list(range(400, 430))
LONG = 160


def _pods(stack: Stack) -> dict[str, str]:
    return {p["pool"]: p["address"] for p in stack.pools()["pods"]}


def _greedy(max_tokens: int) -> pb.SamplingParams:
    return sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                            ignore_eos=True))


def test_a_duplicate_request_id_is_refused_and_the_original_finishes_exactly(
        stack: Stack) -> None:
    pods = _pods(stack)
    before = stack.decode_free_blocks()
    first_arrived = threading.Event()
    original: list[int] = []
    errors: list[BaseException] = []

    def run_original() -> None:
        try:
            with grpc.insecure_channel(pods["decode"]) as channel:
                for msg in pb_grpc.DecodeStub(channel).Generate(pb.GenerateRequest(
                        request_id="dup-1", prompt_token_ids=PROMPT, sampling=_greedy(LONG),
                        prefill_endpoint=pods["prefill"]), timeout=60):
                    for out in msg.outputs:
                        original.extend(out.token_ids)
                    first_arrived.set()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            first_arrived.set()

    thread = threading.Thread(target=run_original)
    thread.start()
    assert first_arrived.wait(30)
    started = time.monotonic()
    with grpc.insecure_channel(pods["decode"]) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.DecodeStub(channel).Generate(pb.GenerateRequest(
            request_id="dup-1", prompt_token_ids=[1, 2, 3], sampling=_greedy(4)), timeout=10))
    assert time.monotonic() - started < 5  # "at once": not the 30 s a transfer waits
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    thread.join(60)
    assert not errors, errors
    assert original == hf_greedy(stack.model_dir, [PROMPT], LONG)[0]
    assert stack.wait_decode_free(before, timeout=5.0) == before


@pytest.mark.parametrize("rid", ["x" * 65, "has space", "caf\u00e9"])
def test_a_request_id_no_kv_transfer_can_carry_is_refused_at_once(
        stack: Stack, rid: str) -> None:
    pods = _pods(stack)
    started = time.monotonic()
    with grpc.insecure_channel(pods["decode"]) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.DecodeStub(channel).Generate(pb.GenerateRequest(
            request_id=rid, prompt_token_ids=PROMPT, sampling=_greedy(4),
            prefill_endpoint=pods["prefill"]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < 5  # "at once": not the 30 s a transfer waits


@pytest.mark.parametrize("change,code", [
    ({"transfer_id": "t" * 65}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"connector": "carrier-pigeon"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"connector": "ucx"}, grpc.StatusCode.FAILED_PRECONDITION),  # known, not this pod's
])
def test_a_bad_kv_target_fails_at_once_and_holds_nothing(
        stack: Stack, change: dict, code: grpc.StatusCode) -> None:
    pods = _pods(stack)
    with grpc.insecure_channel(pods["prefill"]) as channel:
        stub = pb_grpc.PrefillStub(channel)
        load = stub.GetLoad(pb.LoadRequest(), timeout=5)
        target = {"connector": "tcp", "address": "127.0.0.1:1", "transfer_id": "t-1",
                  "block_ids": [0, 1], "layout_fingerprint": load.layout_fingerprint, **change}
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Prefill(pb.PrefillRequest(
                request_id="bad-target", prompt_token_ids=PROMPT, sampling=_greedy(4),
                kv_target=pb.KVTarget(**target)), timeout=30)
        assert time.monotonic() - started < 5  # "at once": not the 30 s a transfer waits
        assert caught.value.code() == code, caught.value.details()
        after = stub.GetLoad(pb.LoadRequest(), timeout=5)
        assert after.running == 0 and after.free_blocks == after.total_blocks
