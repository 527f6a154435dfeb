"""Numerically extreme requests next to ordinary ones, through `pdserve up` (issue 11).

8 greedy streams keep streaming to completion with transformers' tokens while another
client sends each extreme request -- a temperature of 1e-40, tiny and huge penalties,
min_tokens with stop ids covering the whole vocabulary, NaN in the JSON -- which get a 400
or a sane answer, never a 5xx. Straight to the pods over gRPC, NaN and inf sampling values
are refused with INVALID_ARGUMENT. Every decode block comes back afterwards.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from e2e_helpers import POD_ARGS, Stack, start_stack, stream_greedy_ids
from hf_reference import hf_greedy

from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import sampling_to_proto

pytestmark = pytest.mark.timeout(300)

STREAMS = 8
MAX_TOKENS = 48
VOCAB = 2048  # models/default


@pytest.fixture(scope="module")
def colocated(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-hostile-colocated"),
                     "--mode", "colocated", "--decode", "1", "--pod-args", POD_ARGS) as s:
        yield s


@pytest.fixture(params=["1p1d", "colocated"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue("stack" if request.param == "1p1d" else "colocated")


def _extremes() -> list[dict[str, Any]]:
    every = list(range(VOCAB))
    return [
        {"temperature": 1e-40},
        {"temperature": 1e-6, "top_p": 1e-9},
        {"temperature": 3e38},
        {"temperature": 1e39},  # not a float32: 400
        {"temperature": 1.0, "repetition_penalty": 1e-40},
        {"temperature": 1e-4, "repetition_penalty": 1e-38, "top_k": 2},
        {"temperature": 1.0, "repetition_penalty": 3e38},
        {"temperature": 0.0, "repetition_penalty": 1e-50},  # 0 as a float32: 400
        {"temperature": 0.5, "frequency_penalty": 2.0, "presence_penalty": -2.0,
         "repetition_penalty": 1e-30, "min_p": 1.0},
        {"temperature": 1.0, "min_tokens": 6, "stop_token_ids": every},
        {"temperature": 0.0, "min_tokens": 6, "stop_token_ids": every},
        {"temperature": 1e-30, "min_tokens": 6, "stop_token_ids": every[1:], "top_p": 1e-9},
    ]


async def _hostile(stack: Stack, http: httpx.AsyncClient) -> list[tuple[str, int, str]]:
    """Each extreme request (several times each, streamed and not): (what, status, body)."""
    seen = []
    bodies = [{"model": stack.model, "prompt": [7, 8, 9], "max_tokens": 8, "seed": 1, **e}
              for e in _extremes()]
    for _ in range(2):
        for body in bodies:
            for stream in (False, True):
                reply = await http.post("/v1/completions", json={**body, "stream": stream})
                seen.append((repr(body)[:120], reply.status_code, reply.text[-300:]))
    raw = ('{"model": "' + stack.model + '", "prompt": "x", "max_tokens": 4, '
           '"temperature": NaN}')
    for field in ("temperature", "repetition_penalty", "top_p"):
        reply = await http.post("/v1/completions", content=raw.replace("temperature", field),
                                headers={"content-type": "application/json"})
        seen.append((f"{field}: NaN", reply.status_code, reply.text[-300:]))
    return seen


async def _together(stack: Stack, prompts: list[list[int]]
                    ) -> tuple[list[tuple[list[int], str | None]], list[tuple[str, int, str]]]:
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with stack.async_client() as client, httpx.AsyncClient(
            base_url=stack.url, timeout=60, headers=headers) as http:
        streams = asyncio.gather(*(stream_greedy_ids(stack, client, p, MAX_TOKENS)
                                   for p in prompts))
        hostile = asyncio.create_task(_hostile(stack, http))
        return await streams, await hostile


def test_extreme_requests_never_disturb_8_streams_nor_get_a_5xx(any_stack: Stack) -> None:
    stack = any_stack
    before = stack.decode_free_blocks()
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randint(5, 40))]
               for _ in range(STREAMS)]
    results, hostile = asyncio.run(_together(stack, prompts))
    assert [f for _, f in results] == ["length"] * STREAMS
    assert [ids for ids, _ in results] == hf_greedy(stack.model_dir, prompts, MAX_TOKENS)
    bad = [h for h in hostile if h[1] not in (200, 400)]
    assert not bad, bad
    assert all("Traceback" not in body for _, _, body in hostile)
    refused = {what for what, status, _ in hostile if status == 400}
    assert any("1e+39" in w for w in refused) and any("1e-50" in w for w in refused)
    assert any("NaN" in w for w in refused)
    # only those five were refused: every value float32 carries was served
    assert len(refused) == 5, refused
    assert stack.wait_decode_free(before, timeout=5.0) == before


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan),
    ("min_p", math.inf), ("repetition_penalty", math.nan), ("repetition_penalty", math.inf),
    ("frequency_penalty", math.nan), ("presence_penalty", -math.inf)])
def test_nan_and_inf_sent_to_the_pods_directly_are_invalid_arguments(
        stack: Stack, field: str, value: float) -> None:
    sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4))
    setattr(sampling, field, value)
    pods = {p["pool"]: p["address"] for p in stack.pools()["pods"]}
    with grpc.insecure_channel(pods["decode"]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.DecodeStub(channel).Generate(pb.GenerateRequest(
                prompt_token_ids=[5, 6, 7], sampling=sampling), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()
    with grpc.insecure_channel(pods["prefill"]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.PrefillStub(channel).Prefill(pb.PrefillRequest(
                request_id="nan", prompt_token_ids=[5, 6, 7], sampling=sampling,
                kv_target=pb.KVTarget(connector="tcp", address="127.0.0.1:1", transfer_id="x",
                                      block_ids=[0])), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()
