"""``pdserve up --prefill-pod-args / --decode-pod-args``: engine options for one role only,
after ``--pod-args`` (a prefill pod may take longer steps than a decode pod, which must
keep its inter-token latency). Each pod reports its limits; the router serves the
smallest context of its pods, and a completion through both still works."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import POD_ARGS, start_stack

pytestmark = pytest.mark.timeout(180)


def test_each_role_gets_its_own_engine_options(default_model_dir: Path,
                                                tmp_path: Path) -> None:
    with start_stack(default_model_dir, tmp_path, "--prefill", "1", "--decode", "1",
                     "--pod-args", f"{POD_ARGS} --max-model-len 1024",
                     "--prefill-pod-args", "--max-model-len 512",
                     "--decode-pod-args", "--max-model-len 768") as stack:
        lens = {p["pool"]: p["max_model_len"] for p in stack.pools()["pods"]}
        assert lens == {"prefill": 512, "decode": 768}
        models = stack.client().models.list().data
        assert models[0].max_model_len == 512  # the smallest context any pod can serve
        out = stack.client().completions.create(model=stack.model, prompt="hello there",
                                                max_tokens=4, temperature=0)
        assert out.choices[0].text is not None and out.usage.completion_tokens == 4
