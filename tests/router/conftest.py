"""Router test fixtures: scripted decode pods (see scripted_decode.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scripted_decode import ScriptedPod, start_scripted_pod


@pytest.fixture(scope="module")
def scripted_pod(tiny_model: Path) -> Iterator[ScriptedPod]:
    from engine.tokenizer import load_tokenizer

    pod = start_scripted_pod(load_tokenizer(tiny_model).eos_token_id)
    yield pod
    pod.stop()
