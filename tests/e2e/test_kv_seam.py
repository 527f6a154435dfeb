"""The KV seam seen from outside, through ``pdserve up``:
- a multi-turn chat moves only the new turn's KV (the decode pod keeps what it caches);
- a slow transfer in flight does not slow other requests' decode steps;
- the router validates prompts against the limits the pods report, not config.json's.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e_helpers import POD_ARGS, Stack, check_second_turn_moves_only_missing_blocks, start_stack

pytestmark = pytest.mark.timeout(300)

KV_TESTS = Path(__file__).resolve().parents[1] / "kv_transfer"


def test_a_second_turn_moves_only_the_blocks_the_decode_pod_lacks(stack: Stack,
                                                                  tokenizer: Any) -> None:
    check_second_turn_moves_only_missing_blocks(stack, tokenizer)


def test_a_slow_transfer_does_not_hold_up_other_requests_decode_steps(
        default_model_dir: Path, tmp_path: Path) -> None:
    delay = 2.0
    env = {"PDSERVE_KV_BACKENDS": "slow_backend", "PDSERVE_SLOW_KV_DELAY_S": str(delay),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(KV_TESTS),
                                                       os.environ.get("PYTHONPATH")]))}
    with start_stack(default_model_dir, tmp_path, "--prefill", "1", "--decode", "1",
                     "--connector", "slowtcp", "--pod-args", POD_ARGS, env=env) as stack:
        client = stack.client()
        # A long generation (seconds: it must outlast the slow transfer below), decoding on
        # the decode pod (its own transfer was slow too).
        stream = client.completions.create(
            model=stack.model, prompt="def main():", max_tokens=1900, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        arrivals: list[float] = []
        chunks = iter(stream)
        for _ in range(5):  # it is decoding now
            next(chunks)
        slow: dict[str, float] = {}

        def another() -> None:  # a new request whose KV is held up for `delay` seconds
            t0 = time.monotonic()
            out = client.completions.create(model=stack.model, prompt="class Slow:",
                                            max_tokens=4, temperature=0)
            slow["start"], slow["end"] = t0, time.monotonic()
            assert out.choices[0].text is not None

        thread = threading.Thread(target=another)
        thread.start()
        for _ in chunks:
            arrivals.append(time.monotonic())
        thread.join(60)
        assert slow["end"] - slow["start"] >= delay  # the transfer was in flight that long
        during = [t for t in arrivals if slow["start"] <= t <= slow["end"]]
        gaps = [b - a for a, b in itertools.pairwise(during)]
        assert len(during) >= 10, "the long stream produced nothing during the transfer"
        assert max(gaps) < delay / 4, f"a decode step waited for the transfer: {max(gaps):.2f}s"


def test_the_router_refuses_a_prompt_over_the_pods_reported_limit(
        default_model_dir: Path, tmp_path: Path) -> None:
    with start_stack(default_model_dir, tmp_path, "--prefill", "1", "--decode", "1",
                     "--pod-args", f"{POD_ARGS} --max-model-len 128") as stack:
        client = stack.client()
        assert stack.client().models.retrieve(stack.model).model_extra["max_model_len"] == 128
        fits = client.completions.create(model=stack.model, prompt=[7] * 100, max_tokens=4)
        assert fits.usage is not None and fits.usage.prompt_tokens == 100
        # 200 tokens: within config.json's 2048, beyond the pods' 128
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=stack.model, prompt=[7] * 200, max_tokens=4)
        assert "128" in caught.value.message and "200" in caught.value.message
        assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
