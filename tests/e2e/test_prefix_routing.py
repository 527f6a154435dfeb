"""Prefix-aware routing end to end: 2 prefill pods behind the router (``--routing prefix``,
pods without a KV tier, so a hit can only be a pod's own cache), 8 distinct system prompts
of 1,792 tokens, each sent 4 times with a different question, in random order: once warm,
>= 90% of requests find their prefix in the chosen pod's cache, and neither pod takes more
than 65% of them. Answers equal transformers' greedy."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from e2e_helpers import start_stack
from hf_reference import hf_greedy
from tier_e2e_helpers import NEW_TOKENS, complete, prefill_metric, prompt_of, served_prefill

pytestmark = pytest.mark.timeout(420)

SYSTEM_TOKENS = 7 * 256
OK = "pdserve:requests_total"
LABELS = 'outcome="ok",role="prefill"'


def test_prefix_routing_keeps_each_system_prompt_on_one_pod_and_balances_them(
        default_model_dir: Path, tmp_path: Path) -> None:
    systems = [prompt_of(500 + i, SYSTEM_TOKENS) for i in range(8)]
    order = [i for i in range(8) for _ in range(4)]
    random.Random(5).shuffle(order)
    rng = random.Random(6)
    prompts = [systems[i] + rng.choices(range(2048), k=12) for i in order]
    with start_stack(default_model_dir, tmp_path, "--prefill", "2", "--decode", "1",
                     "--pod-args", "--dtype float32 --num-kv-blocks 1200 --kv-tier none",
                     "--router-args", "--routing prefix") as stack:
        seen: set[int] = set()
        warm_hits = warm = 0
        served: Counter[str] = Counter()
        answers = []
        for i, prompt in zip(order, prompts, strict=True):
            before = prefill_metric(stack, OK, LABELS)
            tokens, cached = complete(stack, prompt)
            served[served_prefill(before, prefill_metric(stack, OK, LABELS))] += 1
            answers.append(tokens)
            if i in seen:
                warm += 1
                warm_hits += cached >= SYSTEM_TOKENS
            seen.add(i)
    assert warm == 24
    assert warm_hits / warm >= 0.9, f"{warm_hits}/{warm} warm requests hit a pod cache"
    assert max(served.values()) <= 0.65 * len(prompts), served
    check = list(range(0, len(prompts), 4))  # every 4th answer, against transformers
    assert [answers[j] for j in check] == hf_greedy(default_model_dir,
                                                    [prompts[j] for j in check], NEW_TOKENS)
