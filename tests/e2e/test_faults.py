"""Pods facing failures: a prefill pod that is gone, a KV layout that does not match.

Real pod processes (`pdserve prefill` / `pdserve decode`) driven over gRPC. A decode pod
whose prefill pod is unreachable or dead prefills locally (conditional disaggregation) and
still gives transformers' greedy tokens; every reserved block comes back either way.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2e_helpers import free_port
from hf_reference import hf_greedy
from pod_helpers import Pod, free_blocks, generate_on, start_pod

from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import sampling_to_proto

pytestmark = pytest.mark.timeout(180)

PROMPT = list(range(300, 340))
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def decode_pod(default_model_dir: Path) -> Iterator[Pod]:
    pod = start_pod("decode", default_model_dir)
    yield pod
    pod.stop()


def generate(decode: Pod, prefill_endpoint: str) -> tuple[list[int], bool]:
    return generate_on(decode, prefill_endpoint, PROMPT, NEW_TOKENS)


def test_an_unreachable_prefill_pod_means_a_local_prefill_with_the_same_tokens(
        decode_pod: Pod, default_model_dir: Path) -> None:
    before = free_blocks(decode_pod)
    tokens, remote = generate(decode_pod, f"127.0.0.1:{free_port()}")
    assert not remote
    assert tokens == hf_greedy(default_model_dir, [PROMPT], NEW_TOKENS)[0]
    assert free_blocks(decode_pod) == before


def test_a_killed_prefill_pod_means_a_local_prefill_and_no_lost_blocks(
        decode_pod: Pod, default_model_dir: Path) -> None:
    prefill = start_pod("prefill", default_model_dir)
    try:
        before = free_blocks(decode_pod)
        tokens, remote = generate(decode_pod, prefill.address)
        assert remote  # it served while alive
        prefill.stop(signal.SIGKILL)
        again, remote = generate(decode_pod, prefill.address)
        assert not remote
        assert again == tokens == hf_greedy(default_model_dir, [PROMPT], NEW_TOKENS)[0]
        assert free_blocks(decode_pod) == before
    finally:
        prefill.stop(signal.SIGKILL)


def test_a_prefill_pod_refuses_a_kv_target_of_another_layout(default_model_dir: Path) -> None:
    prefill = start_pod("prefill", default_model_dir)
    try:
        with grpc.insecure_channel(prefill.address) as channel:
            stub = pb_grpc.PrefillStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Prefill(pb.PrefillRequest(
                    request_id="mismatch", prompt_token_ids=PROMPT,
                    sampling=sampling_to_proto(SamplingParams(temperature=0.0)),
                    kv_target=pb.KVTarget(connector="tcp", address="127.0.0.1:1",
                                          transfer_id="mismatch", block_ids=[0, 1, 2],
                                          layout_fingerprint="0000000000000000")), timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "layout mismatch" in caught.value.details()
            load = stub.GetLoad(pb.LoadRequest(), timeout=5)
            assert load.running == 0 and load.free_blocks == load.total_blocks
    finally:
        prefill.stop()


def test_a_second_pod_on_a_taken_port_fails_with_a_clear_error(
        decode_pod: Pod, default_model_dir: Path) -> None:
    port = decode_pod.address.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "decode", "--model", str(default_model_dir),
         "--port", port, "--num-kv-blocks", "16"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot listen on" in done.stderr and "Traceback" not in done.stderr
