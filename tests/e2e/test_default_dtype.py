"""``pdserve up`` with the pods' default dtype (``auto``: bf16 on a CPU with native bf16,
fp32 otherwise), one prefill and one decode pod: greedy tokens, with the KV computed by the
prefill pod and moved over tcp in that dtype, equal transformers' run in the same dtype up
to near ties (hf_reference.compare_until_near_tie says why bf16 may part there), and every
decode block comes back. Every other e2e stack runs fp32, to compare exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_helpers import Stack, completion_choices, start_stack
from hf_reference import compare_until_near_tie, hf_greedy_with_logits

from engine.device import resolve_dtype
from engine.kv_layout import DTYPES

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def default_dtype_stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-auto-dtype"),
                     "--prefill", "1", "--decode", "1",
                     "--pod-args", "--num-kv-blocks 256") as s:
        yield s


def test_default_dtype_greedy_tokens_match_transformers_in_that_dtype(
        default_dtype_stack: Stack, tokenizer: Any) -> None:
    stack = default_dtype_stack
    dtype = DTYPES[resolve_dtype("auto", "cpu")]
    prompts = ["def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n",
               "for line in open(path):\n    if line.startswith('#'):\n"]
    ids = [list(tokenizer.encode(p)) for p in prompts]
    free_before = stack.decode_free_blocks()
    client = stack.client()
    ours = []
    for prompt in prompts:
        [choice] = completion_choices(client.completions.create(
            model=stack.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True}))
        ours.append(choice.token_ids)
    theirs = hf_greedy_with_logits(stack.model_dir, ids, MAX_TOKENS, dtype)
    compared = [compare_until_near_tie(o, t, logits, dtype)
                for o, (t, logits) in zip(ours, theirs, strict=False)]
    assert sum(compared) >= MAX_TOKENS, compared  # not every comparison ended at once
    assert stack.wait_decode_free(free_before, timeout=10) == free_before
    assert dtype != torch.float32 or compared == [MAX_TOKENS] * len(prompts)
