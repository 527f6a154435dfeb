"""The ``ucx`` connector (NIXL's UCX backend, DRAM on this CPU machine) end to end:
- through ``pdserve up --connector ucx`` the official openai client gets transformers'
  greedy tokens, and a second chat turn moves only the blocks the decode pod lacks;
- a prefill pod killed mid-transfer: the request is prefilled locally instead and the
  decode pod's blocks all come back within its quarantine;
- a decode pod killed mid-transfer: the prefill pod's blocks all come back within its
  transfer timeout;
- concurrent first requests between two fresh pods share one handshake (each making its own
  replaced the one before: on two GPUs, nccl communicators aborted mid set-up).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from e2e_helpers import (
    POD_ARGS,
    Stack,
    chat_choices,
    check_second_turn_moves_only_missing_blocks,
    collect_stream,
    completion_choices,
    start_stack,
)
from hf_reference import hf_greedy
from pod_helpers import Pod, free_blocks, generate_on, start_pod

from engine.tokenizer import apply_chat_template
from kv_transfer.backends.ucx.agent import nixl_missing
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(nixl_missing() is not None, reason=str(nixl_missing()))]

UCX = ("--kv-connector", "ucx")


@pytest.fixture(scope="module")
def ucx_stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-ucx"), "--prefill", "1",
                     "--decode", "1", "--connector", "ucx", "--pod-args", POD_ARGS) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completions_over_ucx_equal_hf(ucx_stack: Stack, tokenizer: Any,
                                              stream: bool) -> None:
    prompt = ("import os\nimport sys\n\n\nclass Reader:\n    def __init__(self, path):\n"
              "        self.path = path\n\n    def read(self):\n        with open(self.path)")
    out = ucx_stack.client().completions.create(
        model=ucx_stack.model, prompt=prompt, max_tokens=24, temperature=0, stream=stream,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    choices = collect_stream(out, chat=False)[0] if stream else completion_choices(out)
    prompt_ids = list(tokenizer.encode(prompt))
    assert len(prompt_ids) > 32  # several blocks travel
    assert choices[0].token_ids == hf_greedy(ucx_stack.model_dir, [prompt_ids], 24)[0]


def test_greedy_chat_over_ucx_equals_hf(ucx_stack: Stack, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    out = ucx_stack.client().chat.completions.create(
        model=ucx_stack.model, messages=messages, max_tokens=16, temperature=0,  # type: ignore
        extra_body={"ignore_eos": True, "return_token_ids": True})
    want = hf_greedy(ucx_stack.model_dir, [apply_chat_template(tokenizer, messages)], 16)[0]
    assert chat_choices(out)[0].token_ids == want
    (pod,) = ucx_stack.decode_pods()
    assert pod["kv_connector"] == "ucx"
    assert ucx_stack.pod_metric(pod, "pdserve:local_prefills_total") == 0  # it was remote


def test_a_second_turn_over_ucx_moves_only_the_missing_blocks(ucx_stack: Stack,
                                                              tokenizer: Any) -> None:
    check_second_turn_moves_only_missing_blocks(ucx_stack, tokenizer)


@pytest.fixture(scope="module")
def slow_model(model_factory: Any) -> Path:
    """Big enough that a long prompt's prefill takes a good fraction of a second here."""
    return model_factory(layers=16, hidden=512, heads=8, kv_heads=4, vocab=2048)


def prefill_blocks_free(pod: Pod) -> tuple[int, int]:
    with grpc.insecure_channel(pod.address) as channel:
        report = pb_grpc.PrefillStub(channel).GetLoad(pb.LoadRequest(), timeout=5)
    return report.free_blocks, report.total_blocks


def test_a_prefill_pod_killed_mid_transfer_frees_the_decode_pods_blocks(
        slow_model: Path) -> None:
    decode = start_pod("decode", slow_model, *UCX)
    prefill = start_pod("prefill", slow_model, *UCX)
    try:
        prompt = [(7 * i) % 2000 + 4 for i in range(1500)]
        before = free_blocks(decode)
        generate_on(decode, prefill.address, prompt[:40], 2)  # handshake, warm-up
        killer = threading.Timer(0.4, prefill.stop, args=(signal.SIGKILL,))
        killer.start()
        t0 = time.monotonic()
        tokens, remote = generate_on(decode, prefill.address, prompt, 4, timeout=120)
        killer.join()
        assert not remote  # the decode pod prefilled it itself after the prefill pod died
        assert tokens == hf_greedy(slow_model, [prompt], 4)[0]
        deadline = t0 + 30
        while free_blocks(decode) != before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert free_blocks(decode) == before
    finally:
        prefill.stop(signal.SIGKILL)
        decode.stop()


def test_a_decode_pod_killed_mid_transfer_frees_the_prefill_pods_blocks(
        slow_model: Path) -> None:
    prefill = start_pod("prefill", slow_model, *UCX, "--transfer-timeout", "3")
    decode = start_pod("decode", slow_model, *UCX)
    try:
        free0, total = prefill_blocks_free(prefill)
        generate_on(decode, prefill.address, [5] * 40, 2)  # handshake, warm-up
        prompt = [(11 * i) % 2000 + 4 for i in range(1500)]
        call = threading.Thread(target=lambda: _ignore_errors(
            lambda: generate_on(decode, prefill.address, prompt, 4, timeout=60)))
        call.start()
        time.sleep(0.4)
        decode.stop(signal.SIGKILL)
        call.join(60)
        deadline = time.monotonic() + 3 + 2 + 10  # transfer timeout, give-up, slack
        while prefill_blocks_free(prefill)[0] != total and time.monotonic() < deadline:
            time.sleep(0.2)
        assert prefill_blocks_free(prefill) == (total, total)
        assert free0 == total
    finally:
        decode.stop(signal.SIGKILL)
        prefill.stop()


def _ignore_errors(fn: Any) -> None:
    with contextlib.suppress(grpc.RpcError):  # the decode pod was killed under the call
        fn()


def _handshakes(pod: Pod, role: str) -> float:
    """The pod's ``pdserve:kv_handshakes_total`` (its /metrics, port from GetLoad)."""
    with grpc.insecure_channel(pod.address) as channel:
        stub = pb_grpc.DecodeStub(channel) if role == "decode" else pb_grpc.PrefillStub(channel)
        port = stub.GetLoad(pb.LoadRequest(), timeout=5).metrics_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    key = f'pdserve:kv_handshakes_total{{role="{role}"}} '
    return sum(float(line[len(key):]) for line in text.splitlines() if line.startswith(key))


def test_concurrent_first_requests_to_a_prefill_pod_share_one_handshake(
        default_model_dir: Path) -> None:
    decode = start_pod("decode", default_model_dir, *UCX, "--metrics-port", "0")
    prefill = start_pod("prefill", default_model_dir, *UCX, "--metrics-port", "0")
    try:
        prompts = [[(7 * i + 13 * j) % 2000 + 4 for i in range(120)] for j in range(6)]
        with ThreadPoolExecutor(len(prompts)) as pool:  # all before any handshake is done
            results = list(pool.map(lambda p: generate_on(decode, prefill.address, p, 4),
                                    prompts))
        assert [remote for _, remote in results] == [True] * len(prompts)
        assert [tokens for tokens, _ in results] == hf_greedy(default_model_dir, prompts, 4)
        assert _handshakes(decode, "decode") == 1
        assert _handshakes(prefill, "prefill") == 1
    finally:
        prefill.stop()
        decode.stop()
